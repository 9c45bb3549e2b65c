//! Failpoints: a **test facility**, inert unless the `NIMBUS_FAILPOINT` environment variable is set.
//!
//! - `NIMBUS_FAILPOINT=fail:<point>:<n>` makes the `n`-th pass through `<point>` (counting from 1) fail, so
//!   tests can show what nimbus does when something that never fails in a test peer does fail in the field.
//!   Points: `journal-write` (the journal's record of an action starting or finishing).
//! - `NIMBUS_FAILPOINT=after:<operation>:<n>` aborts the process right after the `n`-th call of a provider's
//!   mutating operation returns successfully (`RunInstances`, `AllocateHosts`, `TerminateInstances`,
//!   `ReleaseHosts`), or right after a sandbox's state database was replaced (`state-write`): a crash at the
//!   worst moment, with the world changed and nimbus not yet told. Tests kill an apply at every such boundary
//!   and show the rerun converges without duplicates or leftovers.

use std::sync::atomic::{AtomicU64, Ordering};

static PASSES: AtomicU64 = AtomicU64::new(0);
static AFTER: AtomicU64 = AtomicU64::new(0);

fn spec(kind: &str, point: &str) -> Option<u64> {
    let spec = std::env::var("NIMBUS_FAILPOINT").ok()?;
    let mut parts = spec.splitn(3, ':');
    let (Some(k), Some(p), Some(n)) = (parts.next(), parts.next(), parts.next()) else { return None };
    (k == kind && p == point).then(|| n.parse::<u64>().ok()).flatten()
}

/// True when this pass through `point` must fail.
pub fn fail(point: &str) -> bool {
    let Some(n) = spec("fail", point) else { return false };
    PASSES.fetch_add(1, Ordering::SeqCst) + 1 == n
}

/// Called right after `operation` returned successfully: aborts the process on its `n`-th call when
/// `NIMBUS_FAILPOINT=after:<operation>:<n>`.
pub fn after(operation: &str) {
    let Some(n) = spec("after", operation) else { return };
    if AFTER.fetch_add(1, Ordering::SeqCst) + 1 == n {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "nimbus: failpoint after:{operation}:{n}: aborting");
        std::process::abort();
    }
}
