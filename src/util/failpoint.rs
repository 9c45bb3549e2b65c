//! Failpoints: a **test facility**, inert unless the `NIMBUS_FAILPOINT` environment variable is set.
//!
//! `NIMBUS_FAILPOINT=fail:<point>:<n>` makes the `n`-th pass through `<point>` (counting from 1) fail, so
//! tests can show what nimbus does when something that never fails in a test peer does fail in the field.
//! Points: `journal-write` (the journal's record of an action starting or finishing).

use std::sync::atomic::{AtomicU64, Ordering};

static PASSES: AtomicU64 = AtomicU64::new(0);

/// True when this pass through `point` must fail.
pub fn fail(point: &str) -> bool {
    let Ok(spec) = std::env::var("NIMBUS_FAILPOINT") else { return false };
    let mut parts = spec.splitn(3, ':');
    let (Some("fail"), Some(p), Some(n)) = (parts.next(), parts.next(), parts.next()) else { return false };
    if p != point {
        return false;
    }
    let Ok(n) = n.parse::<u64>() else { return false };
    PASSES.fetch_add(1, Ordering::SeqCst) + 1 == n
}
