//! Reading a finished `meridian` process: exit code, stdout, stderr, and its one JSON object.

use std::process::Output;

use client::exit_code;

/// The exit code.
pub fn code(output: &Output) -> u8 {
    u8::try_from(output.status.code().expect("exited")).expect("exit code fits u8")
}

/// Stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

/// Stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The one JSON object a successful `--json` command prints.
pub fn json(output: &Output) -> serde_json::Value {
    assert_eq!(code(output), exit_code::OK, "{}", stderr(output));
    let text = stdout(output);
    assert_eq!(text.lines().count(), 1, "one JSON object per command: {text}");
    serde_json::from_str(&text).expect("stdout is JSON")
}
