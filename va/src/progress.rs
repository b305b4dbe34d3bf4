//! The progress bar of the long-running commands (`va pack`, `va cat`).

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar counting bytes out of `len` (bar, bytes done, rate, time left), or a hidden
/// one when `quiet`. `prefix` goes before the bar: an indicatif template fragment such as
/// `"{msg:8} "` for a phase name set with [`ProgressBar::set_message`], or `""`.
pub fn byte_progress(quiet: bool, len: u64, prefix: &str) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    let template =
        format!("{prefix}[{{bar:40}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}");
    bar.set_style(
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_valid() {
        for prefix in ["", "{msg:8} "] {
            let template = format!(
                "{prefix}[{{bar:40}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
            );
            assert!(
                ProgressStyle::with_template(&template).is_ok(),
                "{template}"
            );
        }
        assert!(byte_progress(true, 10, "").is_hidden());
    }
}
