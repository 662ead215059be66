//! Property tests of scope containment (SPEC §10): the laws, agreement with brute force, and the
//! grammar. Inputs are generated from the grammar (segments drawn mostly from a few shared ones,
//! so grants overlap), so that nearly every case reaches the assertions; arbitrary strings and
//! near misses, a smaller share, test that whatever breaks the grammar is refused. Each property
//! counts the branches its cases reached, and fails if the interesting ones were rare.

mod support;

use apikeys::{Scopes, ValidationError};
use proptest::prelude::*;
use proptest::sample::Index;
use support::property::check;

/// Segments that many grants share, so that sets overlap and containment goes both ways.
const SHARED: [&str; 4] = ["orders", "read", "a", "b-2_x"];

/// A segment: `[a-z][a-z0-9_-]{0,31}`, usually a shared one.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(SHARED.to_vec()).prop_map(str::to_owned), 1 => "[a-z][a-z0-9_-]{0,31}"]
}

/// Segments joined by `:`, the last ones dropped until the whole fits in `max_len` characters.
fn joined(mut segments: Vec<String>, max_len: usize) -> String {
    while segments.len() > 1 && segments.join(":").len() > max_len {
        segments.pop();
    }
    segments.join(":")
}

/// A scope: 1 to `max_segments` segments (mostly few), at most `max_len` characters.
fn scope(max_segments: usize, max_len: usize) -> impl Strategy<Value = String> {
    let segments = prop_oneof![
        4 => prop::collection::vec(segment(), 1..=3.min(max_segments)),
        1 => prop::collection::vec(segment(), 1..=max_segments),
    ];
    segments.prop_map(move |segments| joined(segments, max_len))
}

/// A grant: `*`, a scope, or `prefix:*` with a prefix of at most 7 segments.
fn grant() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("*".to_owned()),
        4 => scope(8, Scopes::MAX_LEN),
        3 => scope(7, Scopes::MAX_LEN - 2).prop_map(|prefix| format!("{prefix}:*")),
    ]
}

/// Grants as given, and the set they make.
fn scopes() -> impl Strategy<Value = (Scopes, Vec<String>)> {
    prop::collection::vec(grant(), 0..5)
        .prop_map(|grants| (Scopes::new(&grants).expect("grants of the grammar are valid"), grants))
}

/// A set that allows no more than `grants` do: each grant dropped, kept, or narrowed (a wildcard
/// to a scope or a narrower wildcard under it; `*` to any grant).
fn narrowed(grants: &[String]) -> impl Strategy<Value = (Scopes, Vec<String>)> + use<> {
    let each: Vec<_> =
        grants.iter().map(|given| (Just(given.clone()), 0u8..4, segment(), grant()).prop_map(narrow)).collect();
    each.prop_map(|grants| {
        let grants: Vec<String> = grants.into_iter().flatten().collect();
        (Scopes::new(&grants).expect("narrowed grants are valid"), grants)
    })
}

/// One grant dropped (`None`), kept, or narrowed, as `how` says.
fn narrow((grant, how, segment, any_grant): (String, u8, String, String)) -> Option<String> {
    let Some(prefix) = grant.strip_suffix('*') else {
        return (how != 0).then_some(grant); // a scope can only be kept or dropped
    };
    let depth = prefix.matches(':').count(); // segments before the `*`
    let narrower = match how {
        0 => return None,
        1 => grant.clone(),
        _ if prefix.is_empty() => any_grant,
        2 => format!("{prefix}{segment}"),
        _ => format!("{prefix}{segment}:*"),
    };
    let fits = narrower.len() <= Scopes::MAX_LEN && (how != 3 || depth < 7);
    Some(if fits { narrower } else { grant })
}

// ---------------------------------------------------------------------------------------------
// The grammar, written out independently of the crate's one-pass parser

fn is_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    (1..=32).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

fn is_scope_by_the_grammar(scope: &str) -> bool {
    let segments: Vec<&str> = scope.split(':').collect();
    scope.len() <= Scopes::MAX_LEN && segments.len() <= 8 && segments.iter().all(|segment| is_segment(segment))
}

fn is_grant_by_the_grammar(grant: &str) -> bool {
    grant == "*"
        || grant.len() <= Scopes::MAX_LEN
            && match grant.strip_suffix(":*") {
                Some(prefix) => prefix.split(':').count() <= 7 && is_scope_by_the_grammar(prefix),
                None => is_scope_by_the_grammar(grant),
            }
}

/// Whether `grant` covers `scope` by SPEC §10's one rule.
fn covers(grant: &str, scope: &str) -> bool {
    match grant.strip_suffix('*') {
        Some(prefix) => scope.starts_with(prefix),
        None => grant == scope,
    }
}

/// Scopes that tell sets made of `grants` apart: each scope granted and the scopes above it;
/// for `prefix:*`, the prefix itself (which it does not cover) and a scope under it that no
/// grant names; for `*`, a one-segment scope that no grant names. A set that is not within
/// another allows one of these that the other does not.
fn witnesses(grants: &[&str]) -> Vec<String> {
    let unnamed = |under: &str| {
        ('a'..='z').map(|c| format!("{under}{c}")).find(|scope| !grants.contains(&scope.as_str())).unwrap()
    };
    let mut scopes = Vec::new();
    for grant in grants {
        let stem = grant.strip_suffix('*').map(|prefix| prefix.trim_end_matches(':')).unwrap_or(grant);
        let segments: Vec<&str> = stem.split(':').filter(|segment| !segment.is_empty()).collect();
        scopes.extend((1..=segments.len()).map(|depth| segments[..depth].join(":")));
        if let Some(prefix) = grant.strip_suffix('*') {
            scopes.push(unnamed(prefix));
        }
    }
    scopes.sort();
    scopes.dedup();
    scopes
}

// ---------------------------------------------------------------------------------------------
// Near misses of the grammar

/// Lowercase letters, `count` of them.
fn letters(count: usize) -> String {
    ('a'..='z').cycle().take(count).collect()
}

/// A scope of `segments` segments and exactly `len` characters (`segments` at least 4, so that
/// no segment needs more than 32 characters for lengths near 128).
fn scope_of_length(segments: usize, len: usize) -> String {
    let letters_in_all = len - (segments - 1);
    let parts: Vec<String> = (0..segments)
        .map(|i| letters(letters_in_all / segments + usize::from(i < letters_in_all % segments)))
        .collect();
    parts.join(":")
}

/// A grammar scope broken in one way, or pushed to one of the grammar's limits (some of these
/// are still valid: the grammar decides).
fn near_miss() -> impl Strategy<Value = String> {
    (scope(8, Scopes::MAX_LEN), 0u8..18, any::<Index>(), 4usize..=8, 126usize..=130).prop_map(
        |(scope, how, at, segments, len)| match how {
            0 => {
                let at = at.index(scope.len());
                format!("{}{}{}", &scope[..at], scope[at..=at].to_uppercase(), &scope[at + 1..])
            }
            1 => format!("{scope}:"),
            2 => format!(":{scope}"),
            3 => format!("{scope}::{scope}"),
            4 => format!("{scope}:{}", letters(32 + usize::from(at.index(2) == 0))),
            5 => format!("{scope}{}", ":a".repeat(8 - scope.split(':').count() + at.index(2))),
            6 => scope_of_length(segments, len),
            7 => format!("{}:*", scope_of_length(segments, len - 2)),
            8 => format!("{scope}*"),
            9 => format!("*:{scope}"),
            10 => format!("{scope}:**"),
            11 => format!("{scope}:*:a"),
            12 => format!("{}{scope}", ["1", "_", "-"][at.index(3)]),
            13 => format!("{scope} a"),
            14 => format!("{scope}é"),
            15 => String::new(),
            16 => format!("{scope}:{}", ["_a", "-a", "9a", "A"][at.index(4)]),
            _ => format!("{}:*", ["a:b:c:d:e:f:g", "a:b:c:d:e:f:g:h"][at.index(2)]),
        },
    )
}

/// What a caller might pass as a grant: mostly grants of the grammar, then near misses and
/// arbitrary strings.
fn candidate() -> impl Strategy<Value = String> {
    prop_oneof![4 => grant(), 3 => near_miss(), 1 => any::<String>()]
}

// ---------------------------------------------------------------------------------------------
// The properties

/// `a.is_within(b)` says exactly whether every scope `a` allows, `b` allows too: checked on the
/// witnesses of both sets, on independent pairs and on pairs where one was narrowed from the
/// other. Sets within each other both ways are one and the same value (the canonical form).
#[test]
fn containment_agrees_with_brute_force() {
    let pairs = prop_oneof![
        2 => (scopes(), scopes()),
        1 => scopes().prop_flat_map(|b| (narrowed(&b.1), Just(b))),
        1 => scopes().prop_flat_map(|a| (Just(a.clone()), narrowed(&a.1))),
    ];
    let expected = [("within", 30), ("not within", 30), ("equal", 10)];
    check(file!(), 2000, pairs, &expected, |((a, a_grants), (b, b_grants)), reached| {
        let grants: Vec<&str> = a_grants.iter().chain(&b_grants).map(String::as_str).collect();
        let universe = witnesses(&grants);
        let brute = universe.iter().all(|scope| !a.allows(scope) || b.allows(scope));
        prop_assert_eq!(a.is_within(&b), brute, "{:?} within {:?}, over {:?}", a, b, universe);
        reached.hit(if brute { "within" } else { "not within" });
        if brute && b.is_within(&a) {
            prop_assert_eq!(&a, &b, "they allow the same scopes");
            reached.hit("equal");
        }
        Ok(())
    });
}

/// Containment is a preorder with `[]` at the bottom and `*` at the top, and narrowing a set
/// (twice, here) gives a set within it: so every case has a chain `a ⊆ b ⊆ c` to check
/// transitivity on, instead of waiting for random sets to form one.
#[test]
fn containment_is_reflexive_and_transitive() {
    let chains =
        scopes().prop_flat_map(|c| narrowed(&c.1).prop_flat_map(move |b| (narrowed(&b.1), Just(b), Just(c.clone()))));
    let expected = [("a chain", 100), ("a strict chain", 40)];
    check(file!(), 1000, chains, &expected, |((a, _), (b, _), (c, _)), reached| {
        for set in [&a, &b, &c] {
            prop_assert!(set.is_within(set));
            prop_assert!(set.is_within(&Scopes::all()));
            prop_assert!(Scopes::none().is_within(set));
        }
        prop_assert!(b.is_within(&c), "narrowed {:?} from {:?}", b, c);
        prop_assert!(a.is_within(&b), "narrowed {:?} from {:?}", a, b);
        prop_assert!(a.is_within(&c), "{:?} ⊆ {:?} ⊆ {:?}", a, b, c);
        reached.hit("a chain");
        if !c.is_within(&a) {
            reached.hit("a strict chain");
        }
        Ok(())
    });
}

/// A set allows a scope exactly when one of the grants it was made from covers it, whatever
/// their order; checked on the grants' witnesses and on other scopes of the grammar.
#[test]
fn the_canonical_form_allows_exactly_what_was_granted() {
    let cases = (prop::collection::vec(grant(), 0..6), prop::collection::vec(scope(8, Scopes::MAX_LEN), 1..6));
    let expected = [("a scope allowed", 60), ("a scope refused", 60)];
    check(file!(), 2000, cases, &expected, |(grants, others), reached| {
        let scopes = Scopes::new(&grants).unwrap();
        let given: Vec<&str> = grants.iter().map(String::as_str).collect();
        let (mut allowed, mut refused) = (false, false);
        for scope in witnesses(&given).iter().chain(&others) {
            let granted = grants.iter().any(|grant| covers(grant, scope));
            prop_assert_eq!(scopes.allows(scope), granted, "{} under {:?}", scope, grants);
            (allowed, refused) = (allowed || granted, refused || !granted);
        }
        reached.hit(if allowed { "a scope allowed" } else { "no scope allowed" });
        reached.hit(if refused { "a scope refused" } else { "no scope refused" });
        let mut reversed = grants.clone();
        reversed.reverse();
        prop_assert_eq!(Scopes::new(&reversed).unwrap(), scopes, "equal sets are equal values");
        Ok(())
    });
}

/// Grants are accepted exactly when every one follows the grammar, and then each is within the
/// set; otherwise the error is [`ValidationError::Scope`]. A string that is not a scope is never
/// allowed, not even by `*`, so a typo in a route's requirement fails closed.
#[test]
fn grants_are_accepted_exactly_when_they_follow_the_grammar() {
    let expected = [("accepted", 30), ("refused", 30), ("a scope", 25), ("not a scope", 50)];
    check(file!(), 2000, prop::collection::vec(candidate(), 0..4), &expected, |grants, reached| {
        let by_the_grammar = grants.iter().all(|grant| is_grant_by_the_grammar(grant));
        match Scopes::new(&grants) {
            Ok(scopes) => {
                prop_assert!(by_the_grammar, "accepted {:?}", grants);
                prop_assert!(scopes.len() <= grants.len());
                for grant in &grants {
                    prop_assert!(Scopes::new([grant]).unwrap().is_within(&scopes), "{} ∉ {:?}", grant, scopes);
                }
                reached.hit("accepted");
            }
            Err(error) => {
                prop_assert!(!by_the_grammar, "refused {:?}: {}", grants, error);
                prop_assert_eq!(error, ValidationError::Scope);
                reached.hit("refused");
            }
        }
        for candidate in &grants {
            let is_scope = is_scope_by_the_grammar(candidate);
            prop_assert_eq!(Scopes::all().allows(candidate), is_scope, "{:?}", candidate);
            reached.hit(if is_scope { "a scope" } else { "not a scope" });
        }
        Ok(())
    });
}
