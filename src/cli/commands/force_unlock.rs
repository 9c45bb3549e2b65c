//! `nimbus force-unlock LOCK_ID`: frees a remote state lock whose holder is gone, as Terraform's does.

use super::{CommandError, exit, remote_state, runtime};
use crate::cli::ForceUnlockArgs;
use crate::config;
use crate::state::remote::S3State;

pub fn force_unlock(args: &ForceUnlockArgs) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    let Some(state) = remote_state(&loaded) else {
        return Err(CommandError::usage(
            "this fleet keeps its state locally: its lock is held by a running apply's process and freed by the operating system when that process ends",
            "there is nothing to force-unlock; `state: {backend: s3, ...}` locks are the ones that can go stale",
        ));
    };
    let freed = runtime().block_on(async {
        let s3 = S3State::from_config_in(state, &loaded.base_dir).await?;
        s3.force_unlock(&args.lock_id).await
    })?;
    outln!("Lock {} is free (it was held by {}).", freed.id, crate::util::text::terminal(&freed.describe()));
    outln!("The next `nimbus apply` recovers what that run left in the journal.");
    Ok(exit::OK)
}
