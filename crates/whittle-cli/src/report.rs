//! Output helpers: aligned tables on stdout, JSON files written atomically.

use anyhow::Result;
use std::path::Path;

/// Prints rows as a left-aligned text table with a header rule.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(header, rows));
}

/// The text of [`table`].
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    // As many columns as the longest row, so that a cell without a header is still shown.
    let columns = rows.iter().map(Vec::len).fold(header.len(), usize::max);
    let mut width = vec![0; columns];
    for (w, h) in width.iter_mut().zip(header) {
        *w = h.chars().count();
    }
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    out += &"-".repeat(width.iter().sum::<usize>() + 2 * width.len().saturating_sub(1));
    out.push('\n');
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Writes `value` as pretty JSON to `path`, kill-safe (see `whittle::io::atomic`).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    whittle::io::atomic::write_bytes(path, text.as_bytes())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// A progress bar with ETA on stderr.
pub fn progress(total: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The `(done, total)` callback that library functions report progress through, moving `pb`.
pub fn advance(pb: &indicatif::ProgressBar) -> impl FnMut(usize, usize) + '_ {
    |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_cell_is_shown_and_aligned() {
        let t = super::render(&["a", "bb"], &[vec!["1".into(), "22".into(), "333".into()]]);
        assert_eq!(t, "a  bb\n----------\n1  22  333\n");
    }
}
