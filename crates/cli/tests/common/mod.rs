//! Helpers shared by the binary's test files.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the binary.
pub fn cwseg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(args)
        .output()
        .expect("cwseg runs")
}

/// Runs it and asserts success; stdout.
pub fn ok(args: &[&str]) -> String {
    let out = cwseg(args);
    assert!(
        out.status.success(),
        "cwseg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs it and asserts a clean error exit (1); stderr.
pub fn fails(args: &[&str]) -> String {
    let out = cwseg(args);
    assert!(!out.status.success(), "cwseg {args:?} should fail");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean error exit, not a panic (101)"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}
