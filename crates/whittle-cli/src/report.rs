//! Output helpers: aligned tables on stdout, JSON files written atomically.

use anyhow::Result;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {average_eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key("average_eta", AverageEta::default())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    if !std::io::stderr().is_terminal() {
        let log = LogLines::default();
        pb.set_draw_target(indicatif::ProgressDrawTarget::term_like_with_hz(
            Box::new(log),
            1,
        ));
    }
    pb
}

/// The ETA at the average rate since the position first moved in this process. indicatif's
/// own `{eta}` follows the last few steps, so a stall (a paused job, a busy machine) showed
/// "ETA 584942417355y" for hours of a training log; and a resumed run's first move is the jump
/// to its checkpoint's step, which is no rate at all, so the average starts after it.
#[derive(Clone, Default)]
struct AverageEta {
    /// Position and time of the first move, and of the latest tick.
    since: Option<(u64, Instant)>,
    latest: Option<(u64, Instant)>,
    start: Option<u64>,
}

impl indicatif::style::ProgressTracker for AverageEta {
    fn clone_box(&self) -> Box<dyn indicatif::style::ProgressTracker> {
        Box::new(self.clone())
    }

    fn tick(&mut self, state: &indicatif::ProgressState, now: Instant) {
        let pos = state.pos();
        let start = *self.start.get_or_insert(pos);
        if self.since.is_none() && pos != start {
            self.since = Some((pos, now));
        }
        self.latest = Some((pos, now));
    }

    fn reset(&mut self, _: &indicatif::ProgressState, _: Instant) {
        *self = AverageEta::default();
    }

    fn write(&self, state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
        let eta = self
            .since
            .zip(self.latest)
            .zip(state.len())
            .and_then(|((since, latest), len)| average_eta(since, latest, len));
        let _ = match eta {
            Some(d) => write!(w, "{:#}", indicatif::HumanDuration(d)),
            None => w.write_str("?"),
        };
    }
}

/// Time left for `len − pos` more steps at the rate from `since` to `now`; `None` before a
/// step has been timed.
fn average_eta(since: (u64, Instant), (pos, now): (u64, Instant), len: u64) -> Option<Duration> {
    let steps = pos.checked_sub(since.0).filter(|s| *s > 0)?;
    let per_step = now.duration_since(since.1).as_secs_f64() / steps as f64;
    Some(Duration::from_secs_f64(
        per_step * len.saturating_sub(pos) as f64,
    ))
}

/// Fewest seconds between two progress lines in a log.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Where a progress bar draws when stderr is a file or a pipe: indicatif hides its bar there,
/// so a run under `nohup` or `tee` showed no progress and no ETA for hours. Each drawing of
/// the bar becomes one plain line, at most every [`LOG_EVERY`] (the first drawing at once).
#[derive(Debug, Default)]
struct LogLines {
    /// The drawing in progress (indicatif writes it in pieces, then flushes), and when the
    /// last line was printed.
    state: Mutex<(String, Option<Instant>)>,
}

impl LogLines {
    /// The line a drawing becomes, if one is due `now`: cursor moves, padding and empty
    /// drawings dropped.
    fn line_due(&self, now: Instant) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (text, last) = &mut *state;
        let line = std::mem::take(text).replace('\r', "").trim().to_string();
        let due = last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
        (due && !line.is_empty()).then(|| {
            *last = Some(now);
            line
        })
    }
}

impl indicatif::TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)?;
        self.write_str(" ")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0.push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        if let Some(line) = self.line_due(Instant::now()) {
            eprintln!("{line}");
        }
        Ok(())
    }
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
    use indicatif::TermLike;
    use std::time::Duration;

    /// The ETA is the average rate since the first move: steady steps give the plain product,
    /// a long stall raises it by its share instead of blowing it up, a resumed run (first move
    /// at step 120) counts only the steps it timed.
    #[test]
    fn eta_is_the_average_since_the_first_move() {
        let t = std::time::Instant::now();
        let at = |s: u64| t + Duration::from_secs(s);
        let eta = |since, now, len| super::average_eta(since, now, len).map(|d| d.as_secs());
        assert_eq!(eta((1, at(10)), (1, at(10)), 100), None);
        assert_eq!(eta((1, at(10)), (11, at(110)), 100), Some(890));
        // Ten 10-second steps, then a 600-second pause, then one step.
        assert_eq!(eta((1, at(10)), (12, at(720)), 100), Some(5680));
        assert_eq!(eta((120, at(1)), (122, at(61)), 244), Some(3660));
    }

    /// A log gets the first drawing at once, nothing more within [`super::LOG_EVERY`], and the
    /// drawing of the moment after it; cursor returns and padding are dropped.
    #[test]
    fn log_lines_are_spaced_and_plain() {
        let log = super::LogLines::default();
        let t0 = std::time::Instant::now();
        let draw = |s: &str| {
            log.write_str("\r").unwrap();
            log.write_str(s).unwrap();
            log.write_str("    ").unwrap();
        };
        draw("step 1/10");
        assert_eq!(log.line_due(t0).as_deref(), Some("step 1/10"));
        draw("step 2/10");
        assert_eq!(log.line_due(t0 + super::LOG_EVERY / 2), None);
        draw("step 7/10");
        let later = t0 + super::LOG_EVERY;
        assert_eq!(log.line_due(later).as_deref(), Some("step 7/10"));
        // Nothing drawn since: nothing to print.
        assert_eq!(log.line_due(later + super::LOG_EVERY), None);
    }

    #[test]
    fn every_cell_is_shown_and_aligned() {
        let t = super::render(&["a", "bb"], &[vec!["1".into(), "22".into(), "333".into()]]);
        assert_eq!(t, "a  bb\n----------\n1  22  333\n");
    }
}
