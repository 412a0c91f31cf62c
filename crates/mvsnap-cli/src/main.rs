//! `mvsnap`: the command-line front end of the mvsnap engine.
//!
//! Thin by design: parse the command line (clap), call the engine, print. Each command lives in
//! its own file under `commands/`. Errors become one line on stderr, `mvsnap: error: ...`, and
//! exit status 1; usage errors are clap's, with exit status 2.

mod commands;
mod freeze;
mod output;
mod size;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, CommandFactory, Parser, Subcommand};

use commands::Global;

const EXAMPLES: &str = "\
Examples:
  mvsnap format store.img --size 10G
  export MVSNAP_STORE=store.img
  mvsnap origin add disk.img --id disk
  mvsnap snapshot create disk --tag monday --memo 'before the upgrade'
  mvsnap snapshot list
  mvsnap cat disk@monday > monday.img
  mvsnap write disk --offset 1M < patch.bin
  mvsnap check

Sizes and offsets take plain bytes or a K, M, G or T suffix (binary: 1K = 1024).
The store is given by --store STORE or the MVSNAP_STORE environment variable.
Logs go to stderr: -v, -vv, -vvv or RUST_LOG=mvsnap_engine=debug.";

/// A userspace multi-version copy-on-write snapshot engine for block devices and image files.
///
/// A COW store (a file or a block device) holds, for one or more origins, the old data that
/// snapshots need. Snapshots are instant, may be taken of other snapshots, and may be writable.
#[derive(Debug, Parser)]
#[command(name = "mvsnap", version, after_help = EXAMPLES)]
struct Cli {
    /// The COW store: an image file or a block device.
    #[arg(long, global = true, env = "MVSNAP_STORE", value_name = "STORE")]
    store: Option<PathBuf>,

    /// Ephemeral mode: nothing is synced and the snapshots made in this session are discarded
    /// when the store is closed (blksnap's model for backups).
    #[arg(long, global = true)]
    ephemeral: bool,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides it.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Format(commands::format::FormatArgs),
    #[command(subcommand, after_help = commands::origin::EXAMPLES)]
    Origin(commands::origin::OriginCommand),
    #[command(subcommand, after_help = commands::snapshot::EXAMPLES)]
    Snapshot(commands::snapshot::SnapshotCommand),
    Cat(commands::cat::CatArgs),
    Write(commands::write::WriteArgs),
    Check(commands::check::CheckArgs),
    Info(commands::info::InfoArgs),
    Serve(commands::serve::ServeArgs),
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // The FUSE library (serve --mount) logs what it does not implement and replies the kernel
    // no longer waits for (an interrupted request) as warnings and errors: noise below -vv.
    let fuser = if verbose >= 2 { "" } else { ",fuser=off" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default}{fuser}")));
    // A second subscriber cannot be installed in one process; ignore that case.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(verbose >= 2)
        .without_time()
        .try_init();
}

/// The error chain on one line: each cause joined with ": ", skipping a cause whose text its
/// parent already ends with (engine errors often embed their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || msg.ends_with(text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(text);
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);

    let global = Global {
        store: cli.store,
        ephemeral: cli.ephemeral,
    };
    let needs_store = !matches!(cli.command, Command::Format(_));
    if needs_store && global.store.is_none() {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "no store given: pass --store STORE or set MVSNAP_STORE",
            )
            .exit();
    }

    let result = match cli.command {
        Command::Format(args) => args.run(&global),
        Command::Origin(cmd) => cmd.run(&global),
        Command::Snapshot(cmd) => cmd.run(&global),
        Command::Cat(args) => args.run(&global),
        Command::Write(args) => args.run(&global),
        Command::Check(args) => args.run(&global),
        Command::Info(args) => args.run(&global),
        Command::Serve(args) => args.run(&global),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<output::StdoutClosed>() => {
            // Like any Unix filter whose reader went away (`mvsnap cat ... | head`): quiet, and
            // the status a shell reports for SIGPIPE.
            ExitCode::from(141)
        }
        Err(err) => {
            eprintln!("mvsnap: error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn error_chain_is_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(io).context("open x: no such file");
        assert_eq!(one_line(&err), "open x: no such file");

        let err = anyhow::anyhow!("inner\nproblem").context("outer");
        assert_eq!(one_line(&err), "outer: inner problem");
    }
}
