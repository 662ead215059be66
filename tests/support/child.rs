//! Child processes for tests that need a second process: the test binary runs itself again,
//! through its ignored test `child_process`, with `APIKEYS_CHILD` naming the task. A child
//! reports on standard output, one marked line per fact, so the test harness's own output is
//! told apart.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

/// What starts every line of a child's report.
pub const REPORT: &str = "@@ ";

/// Prints one line of a child's report.
macro_rules! report {
    ($($arg:tt)*) => { println!("{}{}", $crate::support::child::REPORT, format_args!($($arg)*)) };
}
pub(crate) use report;

/// How to start a child: directly, or through something that sets limits first.
pub enum Wrapper {
    None,
    /// Without any capability: as root, file permissions then apply as to anyone.
    Unprivileged,
    /// With a limit on file size, as if the disk were nearly full.
    FileSizeLimit {
        blocks_of_512: u64,
    },
}

/// The command that runs `task` in a child, its standard output piped.
pub fn command(task: &str, wrapper: Wrapper) -> Command {
    let exe = std::env::current_exe().unwrap();
    let test_args = ["--ignored", "--exact", "child_process", "--nocapture", "--test-threads=1", "--quiet"];
    let mut command = match wrapper {
        Wrapper::None => Command::new(&exe),
        Wrapper::Unprivileged if is_root() => {
            let mut command = Command::new("setpriv");
            command.args(["--bounding-set=-all", "--"]).arg(&exe);
            command
        }
        Wrapper::Unprivileged => Command::new(&exe),
        Wrapper::FileSizeLimit { blocks_of_512 } => {
            let mut command = Command::new("sh");
            command.args(["-c", &format!("trap '' XFSZ; ulimit -f {blocks_of_512}; exec \"$0\" \"$@\"")]).arg(&exe);
            command
        }
    };
    command.args(test_args).env("APIKEYS_CHILD", task).stdout(Stdio::piped()).stderr(Stdio::inherit());
    command
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|meta| meta.uid() == 0).unwrap_or(false)
}

/// Runs a child to its end and returns its report.
pub fn run(task: &str, wrapper: Wrapper) -> Vec<String> {
    let output = command(task, wrapper).output().unwrap();
    assert!(output.status.success(), "child {task:?} failed: {:?}", output.status);
    reports(String::from_utf8(output.stdout).unwrap().lines().map(str::to_owned))
}

/// The report lines among a child's output, without their marker.
pub fn reports(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    lines.into_iter().filter_map(|line| line.strip_prefix(REPORT).map(str::to_owned)).collect()
}
