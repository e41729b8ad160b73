//! The command line's verbs, each over the layers below: `init`, `run`,
//! `status`, `snapshot` and `backfill` (which share `scan`), `generate`,
//! `dead-letters`.

pub mod backfill;
pub mod dead_letters;
pub mod generate;
pub mod init;
pub mod run;
pub mod scan;
pub mod snapshot;
pub mod status;
