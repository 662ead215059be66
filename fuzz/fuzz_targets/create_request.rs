//! `POST /account/api-keys` with any key header (or one of keys of several scopes, one of another
//! account), content type and body, into an account with room for one more key or none: the answer
//! is always a documented status with a JSON body, a 201 carries a new key of the caller's account
//! that verifies, and no other answer carries a token.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::{Caller, Fixture};
use libfuzzer_sys::fuzz_target;

const ROUTE: &str = "/account/api-keys";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    caller: Caller<'a>,
    content_type: Option<&'a [u8]>,
    body: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let fixture = Fixture::get();
    let Some((request, caller)) = fixture.request(ROUTE, &input.caller, input.content_type, input.body) else {
        return;
    };
    fixture.send(fixture.run(input.caller.room), ROUTE, caller, request);
});
