//! The dashboard in a real browser: `tests/browser/dashboard.mjs` drives Debian's Chromium with
//! playwright-core against `apikeys serve` (sign-in, create and see once, use with curl, revoke a
//! key in use, roll, CSRF, sign-out, the 404 without a credential), checks every page with
//! axe-core, and writes screenshots to `artifacts/dashboard-screenshots`.
//!
//! It needs Node, `npm ci` in `tests/browser`, Chromium at `/usr/bin/chromium` (or
//! `APIKEYS_CHROMIUM`) and curl. Where one is missing the test says so on a line of its own and
//! skips, except under `CI=true`, where it fails: `.ci/run` installs them all.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/skip.rs"]
mod skip;

/// What the browser test needs that this machine lacks, if anything.
fn missing(browser: &Path) -> Option<String> {
    let chromium =
        std::env::var_os("APIKEYS_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let runs =
        |program: &str| Command::new(program).arg("--version").output().is_ok_and(|output| output.status.success());
    if !runs("node") {
        return Some("node is not installed".into());
    }
    if !runs("curl") {
        return Some("curl is not installed".into());
    }
    if !browser.join("node_modules/playwright-core").is_dir() || !browser.join("node_modules/axe-core").is_dir() {
        return Some(format!("playwright-core and axe-core are not installed: run npm ci in {}", browser.display()));
    }
    if !chromium.is_file() {
        return Some(format!(
            "no Chromium at {} (apt-get install chromium, or set APIKEYS_CHROMIUM)",
            chromium.display()
        ));
    }
    None
}

#[test]
fn the_dashboard_works_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser = root.join("tests/browser");
    if skip::skip_for(missing(&browser)) {
        return;
    }
    let output = Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .env("APIKEYS_BIN", env!("CARGO_BIN_EXE_apikeys"))
        .env("APIKEYS_SCREENSHOTS", root.join("artifacts/dashboard-screenshots"))
        .output()
        .expect("node runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{report}");
    assert!(output.status.success(), "the browser test failed:\n{report}");
    assert!(report.contains("checks passed"), "{report}");
}
