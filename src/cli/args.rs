//! Command-line arguments (clap). Only parsing lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "nimbus", version, about = "Declarative CI runner fleets: plan and apply, the Terraform way")]
pub struct Cli {
    /// When to use colour: `auto` honours NO_COLOR and whether output is a terminal.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Write structured logs (tracing events such as `nimbus.machine.provision_start`) to stderr.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a fleet file: syntax, types, and cross references. No network.
    Validate(FleetArg),
    /// Compare the fleet file with what exists and show what apply would do.
    Plan(PlanArgs),
    /// Carry out a plan: from the fleet file (asks first), or a saved plan file.
    Apply(ApplyArgs),
    /// Run the controller: discover → plan → apply every interval, following demand, under the fleet's lock
    /// only while it works. SIGTERM/SIGINT stop it (running actions finish); SIGHUP reloads the fleet file.
    Reconcile(ReconcileArgs),
    /// The host ledger: every dedicated host, what it cost so far, and why it is kept or when it is released.
    Hosts(HostsArgs),
    /// Replay a job trace through the planner and the scaling policy in virtual time; compare with a static pool,
    /// release-as-soon-as-allowed, and the offline lower bound.
    Simulate(SimulateArgs),
    /// Show past runs, their actions and the event log from the journal.
    History(HistoryArgs),
    /// Free a remote state lock whose holder is gone (`state.backend: s3`), by the id its error named.
    ForceUnlock(ForceUnlockArgs),
    /// Record what exists (an inventory) for offline planning.
    Discover(DiscoverArgs),
    /// Print a JSON schema: of the fleet file (the default, for editors), the JSON plan, or an inventory.
    Schema {
        #[arg(value_enum, default_value = "fleet")]
        of: SchemaOf,
    },
    /// Print a shell completion script (`nimbus completions bash > /etc/bash_completion.d/nimbus`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `nimbus man > nimbus.1`.
    Man,
}

#[derive(Debug, Args)]
pub struct FleetArg {
    /// The fleet file.
    #[arg(short = 'f', long = "file", default_value = "fleet.yaml", value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Print the versioned JSON plan document.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print Markdown for a pull-request comment.
    #[arg(long)]
    pub markdown: bool,
    /// Exit 0 when there are no changes, 1 on error, 2 when there are changes.
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Save the plan to FILE, for `nimbus apply FILE` (also spelled `-out FILE`).
    #[arg(long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Plan as of TIME: RFC 3339 (`2026-11-25T12:00:00Z`) or relative (`+25h`, `+2d`).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// Treat the fleet file as untrusted (a pull request's): refuse, before anything runs or connects, when it
    /// differs from this trusted fleet file (the protected branch's) in any field that runs a command, sends a
    /// credential, or chooses whose resources are read or where state lives.
    #[arg(long, value_name = "BASE_FLEET_FILE")]
    pub trusted_base: Option<PathBuf>,
    /// Check the plan against the Rego policies in PATH (a file or a folder; repeatable), besides the fleet file's
    /// `policy.paths`. A `deny` fails the plan (exit 1).
    #[arg(long = "policy", value_name = "PATH")]
    pub policy: Vec<PathBuf>,
    /// Plan against a recorded inventory (`nimbus discover -o`) instead of discovering.
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// Remove or replace machines whose runners are running a job now, killing those jobs. Without it a busy
    /// runner's removal waits until its job has finished.
    #[arg(long)]
    pub interrupt_jobs: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Time between iterations (default: `reconcile.interval`, else `30s`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub interval: Option<std::time::Duration>,
    /// Run one iteration and exit (0: it worked or had nothing to do; 1: it failed).
    #[arg(long)]
    pub once: bool,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address, e.g. `127.0.0.1:9464` (port 0: any free
    /// port; the address is printed).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Journal database (default: `.nimbus/journal.db` beside the fleet file).
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// A plan saved with `nimbus plan -out FILE`. It is refused when the fleet changed since.
    #[arg(value_name = "PLANFILE")]
    pub planfile: Option<PathBuf>,
    /// Apply without asking.
    #[arg(long)]
    pub auto_approve: bool,
    /// Remove or replace machines whose runners are running a job now, killing those jobs. Without it a busy
    /// runner's removal waits until its job has finished.
    #[arg(long)]
    pub interrupt_jobs: bool,
    /// Check the plan against the Rego policies in PATH too (besides `policy.paths`); a `deny` stops the apply
    /// before anything runs.
    #[arg(long = "policy", value_name = "PATH")]
    pub policy: Vec<PathBuf>,
    /// How many actions may run at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub parallelism: u32,
    /// Journal database (default: `.nimbus/journal.db` beside the fleet file).
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Journal database (default: `.nimbus/journal.db` beside the fleet file).
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,
    /// Show the actions of this run (`latest` for the newest).
    #[arg(long, value_name = "ID")]
    pub run: Option<String>,
    /// How many runs and events to show.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ForceUnlockArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// The lock's id, as the error of the apply it stopped names it.
    #[arg(value_name = "LOCK_ID")]
    pub lock_id: String,
}

#[derive(Debug, Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Where to write the inventory (`-` for stdout).
    #[arg(short = 'o', long = "output", value_name = "FILE", default_value = "-")]
    pub output: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SchemaOf {
    Fleet,
    Plan,
    Inventory,
}

#[derive(Debug, Args)]
pub struct HostsArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// Print the ledger as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub fleet: FleetArg,
    /// The job trace: CSV with `submit,duration,labels` (see the README).
    #[arg(long, value_name = "TRACE.csv")]
    pub trace: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The seed of boot and scrub times (the same seed gives the same report).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Accepts Terraform's single-dash spellings (`-out FILE`, `-out=FILE`, `-detailed-exitcode`).
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            for long in
                ["out", "detailed-exitcode", "json", "markdown", "inventory", "at", "auto-approve", "parallelism"]
            {
                let single = format!("-{long}");
                if a == single {
                    return format!("--{long}");
                }
                if let Some(v) = a.strip_prefix(&format!("{single}=")) {
                    return format!("--{long}={v}");
                }
            }
            a
        })
        .collect()
}
