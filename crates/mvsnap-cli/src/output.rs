//! Human-readable output: sizes, times and plain text tables, and printing that survives a
//! closed stdout.

use std::io::Write;

/// Stdout was closed by its reader (`mvsnap check | head`): `main` exits quietly.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// The error for a failed write to stdout: [`StdoutClosed`] when the reader went away.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// What `print!` does, with an error instead of a panic when stdout is gone.
pub fn emit(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// `print!` for commands: returns early with [`StdoutClosed`] when the reader went away.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::emit(format_args!($($arg)*))?
    };
}

/// `println!` for commands, like [`out!`].
macro_rules! outln {
    () => {
        $crate::output::emit(format_args!("\n"))?
    };
    ($($arg:tt)*) => {
        $crate::output::emit(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

pub(crate) use {out, outln};

/// `65536` -> `64 KiB`, `1572864` -> `1.5 MiB`, `100` -> `100 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut scaled = bytes as f64;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if bytes.is_multiple_of(1u64 << (10 * unit)) {
        format!("{} {}", bytes >> (10 * unit), UNITS[unit])
    } else {
        format!("{scaled:.1} {}", UNITS[unit])
    }
}

pub use mvsnap_daemon::display::utc_time;

/// A table printed with columns padded to their widest cell; the last column is not padded.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self, indent: &str) -> String {
        let ncols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; ncols];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::from(indent);
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(10 << 30), "10 GiB");
    }

    #[test]
    fn table() {
        let mut t = Table::new(&["A", "LONGER", "C"]);
        t.row(vec!["xyz".into(), "1".into(), "free text".into()]);
        assert_eq!(t.render(""), "A    LONGER  C\nxyz  1       free text\n");
    }
}
