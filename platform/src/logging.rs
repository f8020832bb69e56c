//! Logs through `tracing`: one line per event on stderr, `key=value` fields, no colours and no
//! timestamp of our own under journald (it stamps each line itself).

use std::io::IsTerminal;
use std::str::FromStr;

use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable with the log filter, e.g. `info` or `warn,dataplane=debug`.
pub const LOG_ENV: &str = "MERIDIAN_LOG";

/// Meridian's own crates log at `info`; dependencies (openraft, quinn, glommio) only warnings.
fn default_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target("dataplane", LevelFilter::INFO)
        .with_target("controlplane", LevelFilter::INFO)
        .with_target("client", LevelFilter::INFO)
}

/// Parses a filter the way [`init`] reads [`LOG_ENV`].
///
/// # Errors
/// A message naming the variable and what is wrong.
pub fn parse_filter(text: &str) -> Result<Targets, String> {
    Targets::from_str(text).map_err(|error| format!("{LOG_ENV}={text:?}: {error}"))
}

/// Installs the process's log subscriber (once; later calls do nothing). A bad [`LOG_ENV`] is
/// reported on stderr and the default filter used.
pub fn init() {
    let filter = match std::env::var(LOG_ENV) {
        Ok(text) if !text.trim().is_empty() => parse_filter(&text).unwrap_or_else(|error| {
            eprintln!("ignoring {error}; logging at the default levels");
            default_filter()
        }),
        _ => default_filter(),
    };
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::stderr().is_terminal());
    let result = if journald {
        tracing_subscriber::registry().with(layer.without_time().with_filter(filter)).try_init()
    } else {
        tracing_subscriber::registry().with(layer.with_filter(filter)).try_init()
    };
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_or_name_the_variable() {
        assert!(parse_filter("warn,dataplane=debug").is_ok());
        let error = parse_filter("dataplane=loud").unwrap_err();
        assert!(error.contains(LOG_ENV) && error.contains("loud"), "{error}");
    }
}
