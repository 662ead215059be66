//! The leak scanner: never panics; streamed in chunks it finds exactly what it finds in the
//! whole input at once, wherever the chunks end; every finding is a token at the line and column
//! it names; and a real token planted anywhere is found.
#![no_main]

use std::sync::LazyLock;

use apikeys::leak::{Content, Scanner};
use apikeys::{Environment, KeyFormat, TokenParts};
use libfuzzer_sys::fuzz_target;

static TOKEN: LazyLock<String> =
    LazyLock::new(|| KeyFormat::new("as", Environment::LIVE).unwrap().generate().unwrap().0.expose_secret().to_owned());

fuzz_target!(|data: &[u8]| {
    let [a, b, plant_at, rest @ ..] = data else { return };
    // Up to 128 KiB of spaces first, so that the input crosses the 64 KiB pieces a file is read
    // in wherever the fuzzer likes; then the input, with a token planted in it.
    let padding = usize::from(u16::from_le_bytes([*a, *b])) * 2;
    let mut input = vec![b' '; padding];
    let plant = usize::from(*plant_at) * rest.len() / 256;
    input.extend_from_slice(&rest[..plant]);
    input.extend_from_slice(TOKEN.as_bytes());
    input.extend_from_slice(&rest[plant..]);

    let scanner = Scanner::any();
    let whole = scanner.scan_bytes(&input);
    let mut streamed = Vec::new();
    let content = scanner.scan_reader(input.as_slice(), |finding| streamed.push(finding)).unwrap();
    let places = |found: &[apikeys::leak::Finding]| {
        found.iter().map(|f| (f.line, f.column, f.token.expose_secret().to_owned())).collect::<Vec<_>>()
    };
    match content {
        Content::Text => assert_eq!(places(&streamed), places(&whole), "streamed as found whole"),
        Content::Binary => assert!(streamed.is_empty() && input[..input.len().min(8192)].contains(&0)),
    }
    assert!(whole.iter().any(|found| found.token.expose_secret() == *TOKEN), "the planted token is found");
    for found in &whole {
        let token = found.token.expose_secret();
        assert!(TokenParts::parse(token).is_ok());
        assert!(token.starts_with(found.prefix.as_str()));
        let line = input.split(|&byte| byte == b'\n').nth(found.line as usize - 1).expect("the line exists");
        let at = found.column as usize - 1;
        assert_eq!(line.get(at..at + token.len()), Some(token.as_bytes()), "the token is where it is said to be");
    }
});
