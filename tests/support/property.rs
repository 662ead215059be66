//! Property runs that count which branches of the property their inputs reached: a property
//! whose inputs almost never get past its early checks passes without testing anything, so each
//! run also asserts that every interesting branch ran in a fair share of its cases.

use std::cell::RefCell;
use std::collections::BTreeMap;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};

/// How often each labelled branch of a property ran, over all the cases of a run.
#[derive(Debug, Default)]
pub struct Reached(RefCell<BTreeMap<&'static str, u32>>);

impl Reached {
    /// Counts one pass through `branch`.
    pub fn hit(&self, branch: &'static str) {
        *self.0.borrow_mut().entry(branch).or_default() += 1;
    }

    fn count(&self, branch: &str) -> u32 {
        self.0.borrow().get(branch).copied().unwrap_or(0)
    }
}

/// Runs `property` on `cases` inputs of `strategy` as `proptest!` does (a failure is shrunk and
/// saved to the regressions file next to `source_file`, saved failures run first), then panics
/// unless each branch of `expected`, `(label, percent)`, was reached in at least that percentage
/// of the cases.
pub fn check<S: Strategy>(
    source_file: &'static str,
    cases: u32,
    strategy: S,
    expected: &[(&'static str, u32)],
    property: impl Fn(S::Value, &Reached) -> TestCaseResult,
) {
    let reached = Reached::default();
    let mut runner = TestRunner::new(Config { cases, source_file: Some(source_file), ..Config::default() });
    if let Err(failure) = runner.run(&strategy, |value| property(value, &reached)) {
        panic!("{failure}\n{runner}");
    }
    for &(branch, percent) in expected {
        let count = reached.count(branch);
        assert!(
            count * 100 >= percent * cases,
            "only {count} of {cases} cases reached {branch:?} (expected {percent} %): the inputs miss the property; \
             reached: {:?}",
            reached.0.borrow()
        );
    }
}
