//! Property tests of scope containment (SPEC §10): the laws, and agreement with brute force
//! over a small universe of scopes.

use apikeys::Scopes;
use proptest::prelude::*;

/// Segments grants are made of.
const SEGMENTS: [&str; 2] = ["a", "b"];
/// Segments of the universe: `z` appears in no grant, so a wildcard always covers a scope that
/// no set of concrete grants covers, as in the real, unbounded universe.
const UNIVERSE_SEGMENTS: [&str; 3] = ["a", "b", "z"];

/// Every scope of 1 to 3 segments over `UNIVERSE_SEGMENTS`: deeper than any grant's prefix.
fn universe() -> Vec<String> {
    let mut scopes: Vec<String> = UNIVERSE_SEGMENTS.iter().map(|s| s.to_string()).collect();
    for _ in 0..2 {
        let deeper: Vec<String> =
            scopes.iter().flat_map(|scope| UNIVERSE_SEGMENTS.iter().map(move |s| format!("{scope}:{s}"))).collect();
        scopes.extend(deeper);
    }
    scopes.sort();
    scopes.dedup();
    scopes
}

/// A grant: `*`, a scope of 1–2 segments, or such a scope followed by `:*`.
fn grant() -> impl Strategy<Value = String> {
    let scope = prop::collection::vec(prop::sample::select(SEGMENTS.to_vec()), 1..=2).prop_map(|s| s.join(":"));
    prop_oneof![1 => Just("*".to_owned()), 4 => scope.clone(), 3 => scope.prop_map(|s| format!("{s}:*"))]
}

fn scopes() -> impl Strategy<Value = Scopes> {
    prop::collection::vec(grant(), 0..5).prop_map(|grants| Scopes::new(grants).unwrap())
}

/// What a set allows, scope by scope, over the universe.
fn allowed(scopes: &Scopes) -> Vec<bool> {
    universe().iter().map(|scope| scopes.allows(scope)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn containment_agrees_with_brute_force(a in scopes(), b in scopes()) {
        let brute = allowed(&a).iter().zip(allowed(&b)).all(|(in_a, in_b)| !in_a || in_b);
        prop_assert_eq!(a.is_within(&b), brute, "{:?} within {:?}", a, b);
    }

    #[test]
    fn containment_is_reflexive_and_transitive(a in scopes(), b in scopes(), c in scopes()) {
        prop_assert!(a.is_within(&a));
        prop_assert!(a.is_within(&Scopes::all()));
        prop_assert!(Scopes::none().is_within(&a));
        if a.is_within(&b) && b.is_within(&c) {
            prop_assert!(a.is_within(&c), "{:?} ⊆ {:?} ⊆ {:?}", a, b, c);
        }
    }

    #[test]
    fn the_canonical_form_allows_exactly_what_was_granted(grants in prop::collection::vec(grant(), 0..6)) {
        let scopes = Scopes::new(&grants).unwrap();
        for scope in universe() {
            let granted = grants.iter().any(|grant| match grant.strip_suffix('*') {
                Some(prefix) => scope.starts_with(prefix),
                None => *grant == scope,
            });
            prop_assert_eq!(scopes.allows(&scope), granted, "{} under {:?}", scope, grants);
        }
        // Equal sets are equal values, whatever the order they were given in.
        let mut reversed = grants.clone();
        reversed.reverse();
        prop_assert_eq!(Scopes::new(&reversed).unwrap(), scopes);
    }

    #[test]
    fn any_string_is_a_valid_grant_or_a_typed_error(grants in prop::collection::vec(any::<String>(), 0..3)) {
        if let Ok(scopes) = Scopes::new(&grants) {
            prop_assert!(scopes.len() <= grants.len());
        }
    }
}
