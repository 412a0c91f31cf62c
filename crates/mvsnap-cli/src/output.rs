//! Human-readable output: sizes, times and plain text tables, and printing that survives a
//! closed stdout.

use std::io::{IsTerminal, Write};

use clap::builder::PossibleValuesParser;

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

/// One size style everywhere, binary units with one decimal: `100 B`, `64.0 KiB`, `1.5 MiB`,
/// `10.0 GiB` (the units `parse_size` reads: 1 KiB = 1024).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut scaled = bytes as f64;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // 1023.96 KiB would print as `1024.0 KiB`: say `1.0 MiB` instead.
    if (scaled * 10.0).round() >= 10240.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1} {}", UNITS[unit])
}

pub use mvsnap_daemon::display::utc_time;

/// `--progress`: when long commands report how far they are, on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, nothing otherwise.
    #[default]
    Auto,
    /// Never.
    Never,
    /// JSON lines, one a second and one at the end:
    /// {"op":"cat","done":BYTES,"total":BYTES} (check: no byte counts, {"op":"check","done":true}).
    Json,
}

/// The options of a command that reports progress.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ProgressArgs {
    /// Progress on stderr: auto (a bar on a terminal, nothing otherwise), never, or json (one
    /// line a second).
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

/// Progress of one command: a bar, JSON lines, or nothing.
pub enum Progress {
    Bar(indicatif::ProgressBar),
    Json {
        op: &'static str,
        total: Option<u64>,
        done: u64,
        last: std::time::Instant,
    },
    Hidden,
}

impl Progress {
    /// Progress over `total` bytes (a spinner when `None`), shown as `mode` says.
    pub fn new(mode: ProgressMode, op: &'static str, what: &str, total: Option<u64>) -> Progress {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        match mode {
            ProgressMode::Never => Progress::Hidden,
            ProgressMode::Json => Progress::Json {
                op,
                total,
                done: 0,
                last: std::time::Instant::now(),
            },
            ProgressMode::Auto if !std::io::stderr().is_terminal() => Progress::Hidden,
            ProgressMode::Auto => {
                let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
                let template = match total {
                    Some(_) => {
                        "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} \
                                {binary_bytes_per_sec} eta {eta}"
                    }
                    None => "{spinner} {msg} {elapsed}",
                };
                if let Ok(style) = ProgressStyle::with_template(template) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_message(format!("{op} {what}"));
                if total.is_none() {
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                }
                Progress::Bar(bar)
            }
        }
    }

    pub fn inc(&mut self, n: u64) {
        match self {
            Progress::Bar(b) => b.inc(n),
            Progress::Json { done, last, .. } => {
                *done += n;
                if last.elapsed() >= std::time::Duration::from_secs(1) {
                    *last = std::time::Instant::now();
                    self.json_line(false);
                }
            }
            Progress::Hidden => {}
        }
    }

    fn json_line(&self, finished: bool) {
        if let Progress::Json {
            op, total, done, ..
        } = self
        {
            let line = match total {
                Some(t) => serde_json::json!({"op": op, "done": done, "total": t}),
                None => serde_json::json!({"op": op, "done": finished}),
            };
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }

    /// The end: a bar disappears; JSON gets its last line.
    pub fn finish(self) {
        match &self {
            Progress::Bar(b) => b.finish_and_clear(),
            Progress::Json { .. } => self.json_line(true),
            Progress::Hidden => {}
        }
    }
}

/// Pretty JSON on stdout, for scripts.
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What a listing's table offers: its columns (for -o, -s, -S), the default ones, and the help
/// lines that differ between listings.
pub trait Listed: std::fmt::Debug + Send + Sync + 'static {
    const NAMES: &'static [&'static str];
    const DEFAULT: &'static str;
    /// Help of -s, saying what order the rows come in without it.
    const SORT_HELP: &'static str;
    /// Help of --json, naming the fields.
    const JSON_HELP: &'static str;
}

/// The options of every listing (`origin list`, `snapshot list`): a table of chosen columns,
/// sorted, styled; or JSON.
#[derive(Debug, clap::Args)]
pub struct Listing<L: Listed> {
    #[command(flatten)]
    pub style: Style,

    /// The columns to show, in order, comma-separated.
    #[arg(short = 'o', value_name = "COL,...", value_delimiter = ',',
          default_value = L::DEFAULT, hide_default_value = true,
          value_parser = PossibleValuesParser::new(L::NAMES.iter().copied()), ignore_case = true)]
    pub columns: Vec<String>,

    #[arg(short = 's', value_name = "COL", conflicts_with = "sort_desc",
          hide_possible_values = true, help = L::SORT_HELP,
          value_parser = PossibleValuesParser::new(L::NAMES.iter().copied()), ignore_case = true)]
    pub sort: Option<String>,

    /// Sort by this column, descending.
    #[arg(short = 'S', value_name = "COL", hide_possible_values = true,
          value_parser = PossibleValuesParser::new(L::NAMES.iter().copied()), ignore_case = true)]
    pub sort_desc: Option<String>,

    #[arg(long, help = L::JSON_HELP,
          conflicts_with_all = ["columns", "sort", "sort_desc", "scripted", "exact"])]
    pub json: bool,

    #[arg(skip)]
    listed: std::marker::PhantomData<L>,
}

impl<L: Listed> Listing<L> {
    /// The rows as the options say: JSON, or a table of `columns`.
    pub fn print<T: serde::Serialize>(
        &self,
        rows: &[T],
        columns: &[Column<T>],
    ) -> anyhow::Result<()> {
        if self.json {
            return print_json(rows);
        }
        print_table(
            rows,
            columns,
            &self.columns,
            self.sort.as_deref(),
            self.sort_desc.as_deref(),
            &self.style,
        )
    }
}

/// "s" unless `n` is one: "1 node", "2 nodes".
pub fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A listing's column names are its table's, in order, and its defaults are among them.
#[cfg(test)]
pub fn assert_listed<L: Listed, T>(columns: &[Column<T>]) {
    let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
    assert_eq!(names, L::NAMES);
    for c in L::DEFAULT.split(',') {
        assert!(L::NAMES.contains(&c), "{c}");
    }
}

/// How tables print, the options every table takes (as `zfs list` and `lvs` have them).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Style {
    /// Scripted mode: no header, columns separated by one tab.
    #[arg(short = 'H')]
    pub scripted: bool,

    /// Exact values: sizes in bytes, times in seconds since the Unix epoch.
    #[arg(short = 'p')]
    pub exact: bool,
}

impl Style {
    pub fn size(&self, bytes: u64) -> String {
        if self.exact {
            bytes.to_string()
        } else {
            human_size(bytes)
        }
    }

    pub fn time(&self, secs: u64) -> String {
        if self.exact {
            secs.to_string()
        } else {
            utc_time(secs)
        }
    }

    pub fn table(&self, header: &[&str]) -> Table {
        Table {
            rows: if self.scripted {
                Vec::new()
            } else {
                vec![header.iter().map(|h| h.to_string()).collect()]
            },
            scripted: self.scripted,
        }
    }
}

/// A cell before it is printed: sizes and times print in the table's style and sort as numbers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    Text(String),
    Count(u64),
    Size(u64),
    Time(u64),
}

impl Value {
    pub fn render(&self, style: &Style) -> String {
        match self {
            Value::Text(t) => t.replace(['\n', '\t'], " "),
            Value::Count(n) => n.to_string(),
            Value::Size(n) => style.size(*n),
            Value::Time(n) => style.time(*n),
        }
    }
}

/// A column a table may show: its name for `-o` and `-s`, and how to get its value from a row.
pub struct Column<T> {
    pub name: &'static str,
    pub get: fn(&T) -> Value,
}

impl<T> Column<T> {
    pub const fn new(name: &'static str, get: fn(&T) -> Value) -> Column<T> {
        Column { name, get }
    }
}

/// Print `rows` as a list command's `-o`, `-s` and `-S` ask: `sort_desc` wins over `sort`.
pub fn print_table<T>(
    rows: &[T],
    columns: &[Column<T>],
    chosen: &[String],
    sort: Option<&str>,
    sort_desc: Option<&str>,
    style: &Style,
) -> anyhow::Result<()> {
    let (sort, desc) = match (sort, sort_desc) {
        (_, Some(c)) => (Some(c), true),
        (c, None) => (c, false),
    };
    let table = select(rows, columns, chosen, sort, desc, style);
    out!("{}", table.render(""));
    Ok(())
}

/// Rows as a table of the chosen columns (by name, in that order), sorted by the values of
/// column `sort` if given (stable: ties keep the engine's order), descending if `descending`.
pub fn select<T>(
    rows: &[T],
    columns: &[Column<T>],
    chosen: &[String],
    sort: Option<&str>,
    descending: bool,
    style: &Style,
) -> Table {
    let find = |name: &str| columns.iter().find(|c| c.name.eq_ignore_ascii_case(name));
    let chosen: Vec<&Column<T>> = chosen.iter().filter_map(|n| find(n)).collect();
    let mut order: Vec<&T> = rows.iter().collect();
    if let Some(col) = sort.and_then(find) {
        let mut keyed: Vec<(Value, &T)> = order.iter().map(|r| ((col.get)(r), *r)).collect();
        // Stable both ways: ties keep the engine's order.
        keyed.sort_by(|a, b| {
            let o = a.0.cmp(&b.0);
            if descending {
                o.reverse()
            } else {
                o
            }
        });
        order = keyed.into_iter().map(|(_, r)| r).collect();
    }
    let header: Vec<String> = chosen.iter().map(|c| c.name.to_uppercase()).collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = style.table(&header);
    for r in order {
        table.row(chosen.iter().map(|c| (c.get)(r).render(style)).collect());
    }
    table
}

/// A table printed with columns padded to their widest cell (the last column is not padded),
/// or tab-separated in scripted mode.
pub struct Table {
    rows: Vec<Vec<String>>,
    scripted: bool,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Style::default().table(header)
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self, indent: &str) -> String {
        if self.scripted {
            return self
                .rows
                .iter()
                .map(|r| format!("{}\n", r.join("\t")))
                .collect();
        }
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
        assert_eq!(human_size(65536), "64.0 KiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(2 << 20), "2.0 MiB");
        assert_eq!(human_size((2 << 20) + 1), "2.0 MiB");
        assert_eq!(human_size(10 << 30), "10.0 GiB");
        assert_eq!(human_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn table() {
        let mut t = Table::new(&["A", "LONGER", "C"]);
        t.row(vec!["xyz".into(), "1".into(), "free text".into()]);
        assert_eq!(t.render(""), "A    LONGER  C\nxyz  1       free text\n");
    }

    #[test]
    fn scripted_and_exact() {
        let style = Style {
            scripted: true,
            exact: true,
        };
        let mut t = style.table(&["A", "B"]);
        t.row(vec!["x y".into(), style.size(3 << 19)]);
        assert_eq!(t.render("  "), "x y\t1572864\n");
        assert_eq!(Style::default().size(3 << 19), "1.5 MiB");
    }

    #[test]
    fn select_and_sort() {
        let cols = [
            Column::<(&str, u64)> {
                name: "name",
                get: |r| Value::Text(r.0.into()),
            },
            Column {
                name: "size",
                get: |r| Value::Size(r.1),
            },
        ];
        let rows = [("b", 2048), ("a", 100), ("c", 1 << 20), ("d", 100)];
        let style = Style {
            scripted: true,
            exact: false,
        };
        let chosen = ["size".to_string(), "name".to_string()];
        let t = select(&rows, &cols, &chosen, Some("size"), false, &style);
        assert_eq!(t.render(""), "100 B\ta\n100 B\td\n2.0 KiB\tb\n1.0 MiB\tc\n");
        let t = select(
            &rows,
            &cols,
            &chosen[1..],
            Some("NAME"),
            true,
            &Style::default(),
        );
        assert_eq!(t.render(""), "NAME\nd\nc\nb\na\n");
        // Descending keeps ties in their order too.
        let t = select(&rows, &cols, &chosen[1..], Some("size"), true, &style);
        assert_eq!(t.render(""), "c\nb\na\nd\n");
    }
}
