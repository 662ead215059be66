//! The loud skip of a test whose machine lacks what it needs.

use std::io::Write as _;

/// Whether the calling test must skip because this machine lacks `missing`: if so, it has said
/// so on standard error, on a line of its own that names the test. Under `CI=true` it fails
/// instead, for CI runs every test.
pub fn skip_for(missing: Option<String>) -> bool {
    let Some(missing) = missing else { return false };
    // libtest names each test's thread after the test.
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: CI=true, and {missing}");
    // Written to stderr directly (the harness captures only the print macros), in one write so
    // that the line stays whole among the other tests' output.
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {missing}\n").as_bytes());
    true
}
