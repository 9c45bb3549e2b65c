//! Every integration test, in one binary so that linking is paid once. Each module was a test file of its
//! own; `common` holds the helpers for tests that need a peer (moto, sshd, Prism).
#![allow(dead_code)]

mod common;

mod api;
mod aws_accounts;
mod aws_moto;
mod cli;
mod config;
mod conformance;
mod drain;
mod e2e_aws_ssh;
mod exec;
mod forge_scenarios;
mod github_prism;
mod hetzner_prism;
mod iam_policy;
mod journal;
mod kill_rerun;
mod local_apply;
mod mixed_fleet;
mod planner;
mod planner_props;
mod policy;
mod reconcile;
mod remote_state;
mod render;
mod simulate;
mod ssh_sshd;
mod trust;
mod workflows;
