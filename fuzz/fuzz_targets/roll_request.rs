//! `POST /account/api-keys/{id}/roll` with any key header (or one of keys of several scopes, one of
//! another account), any key to roll (each of those keys, or any path segment), content type and
//! body (`{"graceSeconds": n}`), into an account with room for one more key or none: the answer is
//! always a documented status with a JSON body, and no answer but a 201 carries a token. A 201
//! rolled the key the path names, of the caller's account, into a key that verifies and has its
//! scopes and expiry; the old key then lives no longer than before, and verifies exactly while its
//! grace period lasts.
#![no_main]

mod common;

use std::fmt::Write;

use arbitrary::Arbitrary;
use common::{Caller, Fixture, NOW};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The route as the OpenAPI document names it.
const ROUTE: &str = "/account/api-keys/{id}/roll";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    caller: Caller<'a>,
    /// The key to roll: one of the fixture's keys (taken modulo their number plus one), or, one
    /// past them, `raw_id` as the path segment.
    target: u8,
    raw_id: &'a [u8],
    content_type: Option<&'a [u8]>,
    body: &'a [u8],
}

/// `raw` as one path segment: the bytes a segment may hold as they are (`%` too, so that malformed
/// escapes are tried), every other byte percent-encoded, `/` included.
fn path_segment(raw: &[u8]) -> String {
    let mut segment = String::new();
    for &byte in raw {
        if byte.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@".contains(&byte) {
            segment.push(char::from(byte));
        } else {
            write!(segment, "%{byte:02X}").unwrap();
        }
    }
    segment
}

fn timestamp(value: &serde_json::Value) -> Option<OffsetDateTime> {
    value.as_str().map(|text| OffsetDateTime::parse(text, &Rfc3339).expect("an RFC 3339 timestamp"))
}

fuzz_target!(|input: Input<'_>| {
    let fixture = Fixture::get();
    let target = fixture.keys.get(usize::from(input.target) % (fixture.keys.len() + 1));
    let segment = target.map_or_else(|| path_segment(input.raw_id), |key| key.record.id.to_string());
    // `/account/api-keys//roll` is not this route: the host's fallback answers it.
    if segment.is_empty() {
        return;
    }
    let uri = format!("/account/api-keys/{segment}/roll");
    let Some((request, caller)) = fixture.request(&uri, &input.caller, input.content_type, input.body) else {
        return;
    };
    let run = fixture.run(input.caller.room);
    let Some(json) = fixture.send(run, ROUTE, caller, request) else { return };
    let old = fixture.keys.iter().find(|key| json["previous"]["id"] == key.record.id.to_string());
    let old = old.expect("a roll names a key it rolled");
    assert!(target.is_none_or(|target| target.record.id == old.record.id), "rolled another key: {json}");
    assert_eq!(Some(&old.record.account), caller.map(|caller| &caller.record.account), "rolled another account's key");
    assert_eq!(json["scopes"], serde_json::to_value(&old.record.scopes).unwrap(), "the new key's scopes");
    assert_eq!(timestamp(&json["expiresAt"]), old.record.expires_at, "the new key's expiry");
    let ends = timestamp(&json["previous"]["expiresAt"]).expect("the old key's grace period ends");
    assert!(NOW <= ends && old.record.expires_at.is_none_or(|before| ends <= before), "the old key's expiry: {json}");
    let verifies = fixture.runtime.block_on(run.service.verify(&old.token)).is_ok();
    assert_eq!(verifies, NOW < ends, "the old key verifies while its grace period lasts, and only then");
});
