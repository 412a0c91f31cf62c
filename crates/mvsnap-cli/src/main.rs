//! `mvsnap`: the command-line front end of the mvsnap engine.
//!
//! Thin by design: parse the command line (clap), call the engine, print. Each command lives in
//! its own file under `commands/`. Errors become one line on stderr, `mvsnap: error: ...`, and
//! exit status 1; usage errors are clap's (or [`commands::UsageError`], printed the same way),
//! with exit status 2.

mod commands;
mod freeze;
mod output;
mod size;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};

use commands::{Global, UsageError};

const EXAMPLES: &str = "\
Examples:
  mvsnap format store.img --size 10G
  export MVSNAP_STORE=store.img
  mvsnap origin add disk.img --id disk
  mvsnap snapshot create disk --tag monday --memo 'before the upgrade'
  mvsnap snapshot list
  mvsnap snapshot ls disk -H -p -o name,exclusive
  mvsnap cat disk@monday > monday.img
  mvsnap write disk --offset 1M < patch.bin
  mvsnap check

Sizes and offsets take bytes or a unit: 4096, 4KB, 64KiB, 1.5M, 10GiB. Every unit is binary
(1K = 1KB = 1KiB = 1024), the units the tables print (2.0 MiB).
The store is given by --store STORE or the MVSNAP_STORE environment variable.
Logs go to stderr: -v, -vv, -vvv or RUST_LOG=mvsnap_engine=debug.
Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.";

/// A userspace multi-version copy-on-write snapshot engine for block devices and image files.
///
/// A COW store (a file or a block device) holds, for one or more origins, the old data that
/// snapshots need. Snapshots are instant, may be taken of other snapshots, and may be writable.
#[derive(Debug, Parser)]
#[command(name = "mvsnap", version, after_help = EXAMPLES)]
struct Cli {
    /// The COW store: an image file or a block device [env: MVSNAP_STORE].
    // Read from the environment by hand, not with clap's `env`: clap then prints `--store` in
    // every usage line as if it were required.
    #[arg(
        long,
        global = true,
        value_name = "STORE",
        help_heading = "Global options"
    )]
    store: Option<PathBuf>,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides it.
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Global options")]
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
    Events(commands::events::EventsArgs),
    Serve(commands::serve::ServeArgs),
    #[command(hide = true)]
    Generate(commands::generate::GenerateArgs),
}

/// The definition of the whole command line (for the man pages and completions).
pub fn cli_command() -> clap::Command {
    Cli::command()
}

fn init_logging(verbose: u8, serving: bool) {
    use tracing_subscriber::EnvFilter;
    // A daemon logs what it does (info) by default; --detach passes that on.
    let quiet = if serving || std::env::var_os("MVSNAP_LOG_DEFAULT").is_some() {
        "info"
    } else {
        "warn"
    };
    let default = match verbose {
        0 => quiet,
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

/// Exit with a usage error (status 2) in clap's form, with the usage of the subcommand named by
/// `path` (`["snapshot", "delete"]`).
fn usage_exit(path: &[String], kind: clap::error::ErrorKind, msg: &str) -> ! {
    let mut cmd = Cli::command();
    cmd.build();
    let mut sub = &mut cmd;
    for name in path {
        if sub.find_subcommand(name).is_none() {
            break;
        }
        sub = sub.find_subcommand_mut(name).expect("found above");
    }
    sub.error(kind, msg).exit()
}

/// fuser's request buffers (16 MiB per FUSE event loop) on transparent huge pages: see
/// `mvsnap_fuse::HugeBufAlloc`.
#[global_allocator]
static ALLOC: mvsnap_fuse::HugeBufAlloc = mvsnap_fuse::HugeBufAlloc;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut path = Vec::new();
    let mut m = &matches;
    while let Some((name, sub)) = m.subcommand() {
        path.push(name.to_string());
        m = sub;
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose, matches!(cli.command, Command::Serve(_)));

    let store = cli.store.or_else(|| {
        std::env::var_os("MVSNAP_STORE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let global = Global {
        store,
        ephemeral: false,
    };
    let needs_store = !matches!(cli.command, Command::Format(_) | Command::Generate(_));
    if needs_store && global.store.is_none() {
        usage_exit(
            &path,
            clap::error::ErrorKind::MissingRequiredArgument,
            "no store given: pass --store STORE or set MVSNAP_STORE",
        );
    }

    let result = match cli.command {
        Command::Format(args) => args.run(&global),
        Command::Origin(cmd) => cmd.run(&global),
        Command::Snapshot(cmd) => cmd.run(&global),
        Command::Cat(args) => args.run(&global),
        Command::Write(args) => args.run(&global),
        Command::Check(args) => args.run(&global),
        Command::Info(args) => args.run(&global),
        Command::Events(args) => args.run(&global),
        Command::Serve(args) => args.run(&global),
        Command::Generate(args) => args.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<output::StdoutClosed>() => {
            // Like any Unix filter whose reader went away (`mvsnap cat ... | head`): quiet, and
            // the status a shell reports for SIGPIPE.
            ExitCode::from(141)
        }
        Err(err) if err.is::<UsageError>() => usage_exit(
            &path,
            clap::error::ErrorKind::ArgumentConflict,
            &err.to_string(),
        ),
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
