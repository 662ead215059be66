//! The signature checks the operations guide shows for receivers in Python and Node, run against
//! signatures this crate makes: they must accept a good delivery and refuse a tampered body, a
//! wrong secret, a stale time and a malformed header, as `webhook::verify_signature` does.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "support/skip.rs"]
mod skip;

use apikeys::webhook::{WebhookSecret, verify_signature};

const SECRET: &str = "whsec_docs_0123456789abcdef0123456789";
const BODY: &str = r#"{"id":"ev_01j9zxkp4qbc7n3m8td5e6fvg2","action":"key.created","detail":{"name":"é"}}"#;

/// The first code block of `language` in the guide's Webhooks section.
fn snippet(language: &str) -> String {
    let guide = include_str!("../docs/operations.md");
    let section = guide.split("\n## Webhooks\n").nth(1).expect("the guide has a Webhooks section");
    let fence = format!("```{language}\n");
    let start = section.find(&fence).unwrap_or_else(|| panic!("a {language} block")) + fence.len();
    section[start..].split("```").next().unwrap().to_owned()
}

/// Each case: a header, the body sent, and whether a receiver must accept it.
fn cases() -> Vec<(String, String, bool)> {
    let secret = WebhookSecret::new(SECRET).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let good = secret.sign(now, BODY.as_bytes());
    let other = WebhookSecret::new("whsec_another_secret_of_enough_bytes").unwrap();
    vec![
        (good.clone(), BODY.into(), true),
        (format!("{good},v1={}", "ab".repeat(32)), BODY.into(), true),
        (format!("t={now},v1={},{}", "ab".repeat(32), &good[good.find("v1=").unwrap()..]), BODY.into(), true),
        (good.clone(), BODY.replace("created", "revoked"), false),
        (other.sign(now, BODY.as_bytes()), BODY.into(), false),
        (secret.sign(now - 3_600, BODY.as_bytes()), BODY.into(), false),
        (secret.sign(now + 3_600, BODY.as_bytes()), BODY.into(), false),
        (good[good.find("v1=").unwrap()..].to_owned(), BODY.into(), false),
        ("garbage".into(), BODY.into(), false),
        (good.replacen(&format!("t={now}"), "t=\u{b2}", 1), BODY.into(), false),
        (format!("t={now},v1=\u{e9}{}", &good[good.find("v1=").unwrap() + 5..]), BODY.into(), false),
        (good.to_uppercase().replace("T=", "t=").replace("V1=", "v1="), BODY.into(), false),
        (format!("t={now},{good}"), BODY.into(), false),
        (format!("{good}zz"), BODY.into(), false),
    ]
}

/// Runs `program file` with the case on its arguments and standard input; whether it accepted.
fn accepts(program: &str, file: &std::path::Path, header: &str, body: &str) -> bool {
    let mut child = Command::new(program)
        .arg(file)
        .args([SECRET, header])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    match String::from_utf8_lossy(&output.stdout).trim() {
        "accepted" => true,
        "refused" => false,
        other => panic!("{program} printed {other:?}"),
    }
}

/// Whether `program` runs here; if not, says so loudly (and fails under CI=true).
fn present(program: &str) -> bool {
    let runs = Command::new(program).arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    !skip::skip_for((!runs).then(|| format!("{program} is not installed")))
}

fn check(program: &str, extension: &str, code: String) {
    if !present(program) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("receiver.{extension}"));
    std::fs::write(&file, code).unwrap();
    for (header, body, expected) in cases() {
        assert_eq!(accepts(program, &file, &header, &body), expected, "{program}: {header} over {body}");
        let rust = verify_signature(
            &WebhookSecret::new(SECRET).unwrap(),
            &header,
            body.as_bytes(),
            time::OffsetDateTime::now_utc(),
            Duration::from_secs(300),
        );
        assert_eq!(rust.is_ok(), expected, "the Rust helper agrees: {header}");
    }
}

#[test]
fn the_python_receiver_of_the_guide_checks_signatures_as_the_crate_makes_them() {
    let harness = "\nimport sys\nok = verify_apikeys_signature(sys.argv[1].encode(), sys.argv[2], sys.stdin.buffer.read())\n\
                   print('accepted' if ok else 'refused')\n";
    check("python3", "py", snippet("python") + harness);
}

#[test]
fn the_node_receiver_of_the_guide_checks_signatures_as_the_crate_makes_them() {
    let harness = "\nconst body = require('node:fs').readFileSync(0);\n\
                   const ok = verifyApikeysSignature(process.argv[2], process.argv[3], body);\n\
                   console.log(ok ? 'accepted' : 'refused');\n";
    check("node", "js", snippet("js") + harness);
}
