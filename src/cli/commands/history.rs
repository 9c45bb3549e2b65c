//! `nimbus history`: runs and events from the journal, or one run's actions.

use super::{CommandError, exit, journal_path, read_journal, remote_state};
use crate::cli::HistoryArgs;
use crate::cli::views::history as view;
use crate::config;

pub fn history(args: &HistoryArgs) -> Result<u8, CommandError> {
    let loaded = config::load(&args.fleet.file)?;
    let path = journal_path(&loaded, args.journal.as_deref());
    if remote_state(&loaded).is_none() && !path.exists() {
        return Err(CommandError::usage(
            format!("no journal at `{}`", path.display()),
            "the journal is created by the first `nimbus apply`",
        ));
    }
    let Some(read) = read_journal(&loaded, args.journal.as_deref())? else {
        return Err(CommandError::usage(
            "the fleet's remote state has no journal yet",
            "the journal is uploaded by the first `nimbus apply`",
        ));
    };
    let j = &read.journal;
    match &args.run {
        Some(run) => {
            let id = if run == "latest" {
                j.latest_run()?
                    .ok_or_else(|| CommandError::usage("the journal has no runs", "run `nimbus apply` first"))?
            } else {
                run.parse().map_err(|_| {
                    CommandError::usage(
                        format!("`{run}` is not a run id"),
                        "use a number from `nimbus history`, or `latest`",
                    )
                })?
            };
            view::actions(id, &j.actions(id)?, args.json);
        }
        None => view::runs_and_events(&j.runs(args.limit)?, &j.events(args.limit)?, args.json),
    }
    Ok(exit::OK)
}
