//! Operation sequences on the service over the memory store, checked against the model of
//! `apikeys::store::model` at every step (the same model the property tests use).
#![no_main]

use apikeys::MemoryStore;
use apikeys::store::model::{ACCOUNTS, Op};
use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// An operation, in a form `arbitrary` can build.
#[derive(Arbitrary, Debug)]
enum Step {
    Create { account: u8, name: Option<String>, expires_in: Option<i16> },
    Verify { key: u8 },
    VerifyMutated { key: u8, position: u8, replacement: char },
    Revoke { caller: u8, target: u8 },
    RevokeAsAdmin { account: u8, target: u8 },
    Advance { seconds: u8 },
    Flush,
}

impl From<Step> for Op {
    fn from(step: Step) -> Self {
        let account = |account: u8| usize::from(account) % ACCOUNTS;
        match step {
            Step::Create { account: a, name, expires_in } => {
                Op::Create { account: account(a), name, expires_in: expires_in.map(i64::from) }
            }
            Step::Verify { key } => Op::Verify { key: key.into() },
            Step::VerifyMutated { key, position, replacement } => {
                Op::VerifyMutated { key: key.into(), position: position.into(), replacement }
            }
            Step::Revoke { caller, target } => Op::Revoke { caller: caller.into(), target: target.into() },
            Step::RevokeAsAdmin { account: a, target } => Op::RevokeAsAdmin { account: account(a), target: target.into() },
            Step::Advance { seconds } => Op::Advance { seconds: seconds.into() },
            Step::Flush => Op::Flush,
        }
    }
}

fn steps(data: &[u8]) -> Result<Vec<Op>> {
    let mut input = Unstructured::new(data);
    let steps: Vec<Step> = input.arbitrary()?;
    Ok(steps.into_iter().take(64).map(Op::from).collect())
}

fuzz_target!(|data: &[u8]| {
    let Ok(ops) = steps(data) else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    if let Err(difference) = runtime.block_on(apikeys::store::model::run(MemoryStore::new(), &ops)) {
        panic!("the service and the model disagree: {difference}\nops: {ops:?}");
    }
});
