//! Finding tokens in files: every `_v1_` is a candidate, and its checksum decides.
//!
//! A file is read in chunks of fixed size, so that a tree of any size, or a minified file that
//! is one long line, is scanned in bounded memory. A file whose first 8 KiB hold a NUL byte is
//! binary, and skipped, as git and ripgrep do.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use memchr::memmem;

use crate::secret::SecretToken;
use crate::token::{BODY_CHARS, KeyFormat, KeyPrefix, MAX_LEAD_LEN, TokenParts};

/// What every token has between its environment and its body.
const MARKER: &[u8] = b"_v1_";
/// How far before a marker a token may start: `{namespace}_{environment}`, 16 + 1 + 8 bytes.
const LOOKBACK: usize = MAX_LEAD_LEN - MARKER.len();
/// How much of a file is read at a time.
const CHUNK: usize = 64 * 1024;
/// How much of a file's start is looked at for a NUL byte.
const BINARY_SNIFF: usize = 8 * 1024;

/// Finds the tokens of some formats in text, by their checksum: a string that only looks like a
/// token (1 in 2³² of those with the right shape) is not one.
///
/// ```
/// # use apikeys::{Environment, KeyFormat};
/// # use apikeys::leak::Scanner;
/// let format = KeyFormat::new("as", Environment::LIVE)?;
/// let (token, prefix) = format.generate()?;
/// let text = format!("config:\n  key: {}\n  fake: as_live_v1_{}\n", token.expose_secret(), "a".repeat(39));
/// let found = Scanner::namespace("as").scan_bytes(text.as_bytes());
/// assert_eq!(found.len(), 1);
/// assert_eq!((found[0].line, found[0].column, &found[0].prefix), (2, 8, &prefix));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Scanner {
    wanted: Wanted,
}

#[derive(Debug, Clone)]
enum Wanted {
    Any,
    Namespace(Box<str>),
    Formats(Vec<KeyFormat>),
}

/// A token found: where (1-based line, and column in bytes), its prefix, and the token itself,
/// for looking it up or revoking it. Its `Debug` shows the prefix only.
#[derive(Debug)]
#[non_exhaustive]
pub struct Finding {
    /// The line the token starts on, from 1.
    pub line: u64,
    /// The byte of that line it starts at, from 1.
    pub column: u64,
    /// Its visible prefix: what to show.
    pub prefix: KeyPrefix,
    /// The token: for [`KeyService::identify`](crate::KeyService::identify) or
    /// [`KeyService::revoke_leaked`](crate::KeyService::revoke_leaked), never to show.
    pub token: SecretToken,
}

/// What a file held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Scanned.
    Text,
    /// A NUL byte in its first 8 KiB: not scanned.
    Binary,
}

/// One step of a scan of paths.
#[derive(Debug)]
pub enum ScanEvent<'a> {
    /// A token in the file at `path`.
    #[allow(missing_docs)]
    Found { path: &'a Path, finding: Finding },
    /// A binary file, skipped.
    #[allow(missing_docs)]
    Binary { path: &'a Path },
    /// A path that could not be read: the scan goes on without it.
    #[allow(missing_docs)]
    Failed { path: &'a Path, error: io::Error },
}

impl Scanner {
    /// Tokens of these formats only.
    pub fn new(formats: impl IntoIterator<Item = KeyFormat>) -> Self {
        Self { wanted: Wanted::Formats(formats.into_iter().collect()) }
    }

    /// Tokens of a namespace, in any environment: a leaked test key is a leak too.
    pub fn namespace(namespace: &str) -> Self {
        Self { wanted: Wanted::Namespace(namespace.into()) }
    }

    /// Tokens of every namespace and environment.
    pub fn any() -> Self {
        Self { wanted: Wanted::Any }
    }

    fn wants(&self, parts: &TokenParts<'_>) -> bool {
        match &self.wanted {
            Wanted::Any => true,
            Wanted::Namespace(namespace) => parts.namespace() == &**namespace,
            Wanted::Formats(formats) => formats.iter().any(|format| {
                format.namespace() == parts.namespace() && format.environment().as_str() == parts.environment()
            }),
        }
    }

    /// The tokens in `bytes`, which are scanned whole: no binary check.
    pub fn scan_bytes(&self, bytes: &[u8]) -> Vec<Finding> {
        let mut found = Vec::new();
        let mut lines = Lines::default();
        let mut last_end = 0;
        self.scan_buffer(bytes, 0, 0, bytes.len(), &mut lines, &mut last_end, &mut |finding| found.push(finding));
        found
    }

    /// Streams `reader` through the scanner, calling `found` for each token in order, unless its
    /// first 8 KiB hold a NUL byte.
    pub fn scan_reader(&self, mut reader: impl Read, mut found: impl FnMut(Finding)) -> io::Result<Content> {
        let mut buffer = Vec::with_capacity(CHUNK + LOOKBACK + BODY_CHARS + MARKER.len());
        let mut base = 0u64;
        let (mut from, mut last_end) = (0, 0);
        let mut lines = Lines::default();
        let mut first = true;
        loop {
            let ended = fill(&mut reader, &mut buffer, CHUNK)?;
            if std::mem::take(&mut first) && memchr::memchr(0, &buffer[..buffer.len().min(BINARY_SNIFF)]).is_some() {
                return Ok(Content::Binary);
            }
            // A marker nearer the end than a body's length waits for the next chunk.
            let end = if ended { buffer.len() } else { buffer.len().saturating_sub(MARKER.len() + BODY_CHARS - 1) };
            self.scan_buffer(&buffer, base, from, end, &mut lines, &mut last_end, &mut found);
            if ended {
                return Ok(Content::Text);
            }
            // Keep what a token starting at a marker from `end` on may need before it.
            let done = end.saturating_sub(LOOKBACK);
            lines.count_to(&buffer, base, base + done as u64);
            buffer.drain(..done);
            base += done as u64;
            from = end - done;
        }
    }

    /// Scans the file at `path`.
    pub fn scan_file(&self, path: &Path, found: impl FnMut(Finding)) -> io::Result<Content> {
        self.scan_reader(fs::File::open(path)?, found)
    }

    /// Scans each path: a file, or a directory and every regular file under it, in name order.
    /// Symbolic links under a directory are not followed (a path given is, as given).
    pub fn scan_paths<P: AsRef<Path>>(&self, paths: impl IntoIterator<Item = P>, mut on: impl FnMut(ScanEvent<'_>)) {
        for root in paths {
            let mut pending = vec![(root.as_ref().to_path_buf(), true)];
            while let Some((path, given)) = pending.pop() {
                let metadata = if given { fs::metadata(&path) } else { fs::symlink_metadata(&path) };
                match metadata {
                    Ok(metadata) if metadata.is_dir() => match sorted_entries(&path) {
                        Ok(entries) => pending.extend(entries.into_iter().rev().map(|entry| (entry, false))),
                        Err(error) => on(ScanEvent::Failed { path: &path, error }),
                    },
                    // FIFOs, sockets and devices could block or never end: only regular files.
                    Ok(metadata) if metadata.is_file() => {
                        let scanned = self.scan_file(&path, |finding| on(ScanEvent::Found { path: &path, finding }));
                        match scanned {
                            Ok(Content::Text) => {}
                            Ok(Content::Binary) => on(ScanEvent::Binary { path: &path }),
                            Err(error) => on(ScanEvent::Failed { path: &path, error }),
                        }
                    }
                    Ok(_) => {}
                    Err(error) => on(ScanEvent::Failed { path: &path, error }),
                }
            }
        }
    }

    /// Reports the tokens at markers from `from` to `end` (exclusive) in `buffer`, which starts
    /// at offset `base` of the input; none starts before `last_end`, where the last one ended.
    #[allow(clippy::too_many_arguments)]
    fn scan_buffer(
        &self,
        buffer: &[u8],
        base: u64,
        from: usize,
        end: usize,
        lines: &mut Lines,
        last_end: &mut u64,
        found: &mut impl FnMut(Finding),
    ) {
        for marker in memmem::find_iter(&buffer[from..], MARKER).map(|at| at + from) {
            if marker >= end {
                break;
            }
            let earliest = usize::try_from(last_end.saturating_sub(base)).unwrap_or(usize::MAX);
            let Some((start, parts)) = token_at(buffer, marker, earliest) else { continue };
            if !self.wants(&parts) {
                continue;
            }
            let Ok(prefix) = KeyPrefix::new(parts.prefix()) else { continue };
            let (line, column) = lines.position(buffer, base, base + start as u64);
            *last_end = base + (start + parts.as_str().len()) as u64;
            found(Finding { line, column, prefix, token: SecretToken::from(parts.as_str().to_owned()) });
        }
    }
}

/// The token whose `_v1_` is at `marker` in `buffer`, starting no earlier than `earliest`: its
/// start and parts. Of the namespaces that the bytes before could be, the longest whose checksum
/// holds wins, so that a token glued to the text before it is still found.
fn token_at(buffer: &[u8], marker: usize, earliest: usize) -> Option<(usize, TokenParts<'_>)> {
    let body = marker + MARKER.len();
    let end = body + BODY_CHARS;
    if buffer.len() < end || !buffer[body..end].iter().all(|&c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)) {
        return None;
    }
    let environment = buffer[..marker].iter().rev().take_while(|c| c.is_ascii_lowercase()).take(9).count();
    let underscore = marker.checked_sub(environment + 1)?;
    if !(1..=8).contains(&environment) || buffer[underscore] != b'_' {
        return None;
    }
    let run = buffer[..underscore].iter().rev().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit()).take(16);
    let longest = underscore - run.count();
    (longest.max(earliest)..underscore.saturating_sub(1)).find_map(|start| {
        let text = std::str::from_utf8(&buffer[start..end]).ok()?;
        TokenParts::parse(text).ok().map(|parts| (start, parts))
    })
}

/// Appends up to `chunk` bytes of the input to `buffer`; whether the input ended (fewer came).
fn fill(reader: &mut impl Read, buffer: &mut Vec<u8>, chunk: usize) -> io::Result<bool> {
    let read = reader.by_ref().take(chunk as u64).read_to_end(buffer)?;
    Ok(read < chunk)
}

fn sorted_entries(directory: &Path) -> io::Result<Vec<PathBuf>> {
    let mut entries =
        fs::read_dir(directory)?.map(|entry| entry.map(|entry| entry.path())).collect::<io::Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

/// Line numbers, counted once over the input as the scan moves on.
#[derive(Default)]
struct Lines {
    /// Newlines before `counted`, the offset counted up to, and the offset the line there
    /// starts at.
    newlines: u64,
    counted: u64,
    line_start: u64,
}

impl Lines {
    /// Counts the newlines of `buffer` (which starts at `base`) up to offset `to`.
    fn count_to(&mut self, buffer: &[u8], base: u64, to: u64) {
        if to <= self.counted {
            return;
        }
        let (from, until) = ((self.counted - base) as usize, (to - base) as usize);
        for newline in memchr::memchr_iter(b'\n', &buffer[from..until]) {
            self.newlines += 1;
            self.line_start = base + (from + newline) as u64 + 1;
        }
        self.counted = to;
    }

    /// The 1-based line and column of offset `at`, at or after the last one asked for.
    fn position(&mut self, buffer: &[u8], base: u64, at: u64) -> (u64, u64) {
        self.count_to(buffer, base, at);
        (self.newlines + 1, at.saturating_sub(self.line_start) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Environment;

    fn token(namespace: &str) -> String {
        KeyFormat::new(namespace, Environment::LIVE).unwrap().generate().unwrap().0.expose_secret().to_owned()
    }

    fn streamed(scanner: &Scanner, text: &[u8]) -> Vec<(u64, u64, String)> {
        let mut found = Vec::new();
        let content = scanner.scan_reader(text, |finding| {
            found.push((finding.line, finding.column, finding.token.expose_secret().to_owned()));
        });
        assert_eq!(content.unwrap(), Content::Text);
        found
    }

    /// A token is found once, where it is, wherever it falls against the chunks a file is
    /// read in, including across their ends.
    #[test]
    fn tokens_across_chunk_ends_are_found_once_where_they_are() {
        let scanner = Scanner::any();
        let key = token("as");
        for start in (CHUNK - key.len() - 30)..(CHUNK + 5) {
            let mut text = "x\n".repeat(10).into_bytes();
            text.resize(start, b' ');
            text.extend_from_slice(key.as_bytes());
            text.extend_from_slice(b"\nand after ");
            text.extend_from_slice(key.as_bytes());
            let line_start = text[..start].iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
            let expected = vec![
                (11, (start - line_start + 1) as u64, key.clone()),
                (12, "and after ".len() as u64 + 1, key.clone()),
            ];
            assert_eq!(streamed(&scanner, &text), expected, "token at {start}");
        }
    }

    #[test]
    fn tokens_glued_to_text_adjacent_or_quoted_are_found_and_look_alikes_are_not() {
        let (first, second) = (token("as"), token("acme42"));
        let mut broken = first.clone().into_bytes();
        let last = broken.len() - 1;
        broken[last] = if broken[last] == b'a' { b'b' } else { b'a' };
        let broken = String::from_utf8(broken).unwrap();
        let text = format!(
            "x{first}{second}\n{{\"key\":\"{second}\"}}\n{broken}\nAS{}\n{}\nend {first}",
            &first[2..],
            first.replace("_v1_", "_v2_")
        );
        let found: Vec<_> =
            streamed(&Scanner::any(), text.as_bytes()).into_iter().map(|(line, column, _)| (line, column)).collect();
        assert_eq!(found, [(1, 2), (1, 2 + first.len() as u64), (2, 9), (6, 5)]);
        let only_as: Vec<_> =
            Scanner::namespace("as").scan_bytes(text.as_bytes()).into_iter().map(|f| f.line).collect();
        assert_eq!(only_as, [1, 6]);
        let test_format = KeyFormat::new("as", Environment::TEST).unwrap();
        assert!(Scanner::new([test_format]).scan_bytes(text.as_bytes()).is_empty());
    }

    #[test]
    fn a_nul_byte_early_makes_a_file_binary_and_one_late_does_not() {
        let key = token("as");
        let early = [b"\0".as_slice(), key.as_bytes()].concat();
        assert_eq!(Scanner::any().scan_reader(early.as_slice(), |_| panic!("scanned")).unwrap(), Content::Binary);
        let mut late = vec![b'a'; BINARY_SNIFF];
        late.push(0);
        late.extend_from_slice(key.as_bytes());
        assert_eq!(streamed(&Scanner::any(), &late).len(), 1);
    }

    #[test]
    fn a_finding_shows_its_prefix_and_never_its_token() {
        let key = token("as");
        let found = Scanner::any().scan_bytes(key.as_bytes());
        let shown = format!("{found:?}");
        assert!(shown.contains(&key[..15]) && !shown.contains(&key[15..]), "{shown}");
    }
}
