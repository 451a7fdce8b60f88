//! `moat lab demo`: the Star Wars walk-through (being written).
use super::{LabError, LabOptions};

/// Run the demo.
pub fn run(_opts: &LabOptions) -> Result<(), LabError> {
    Ok(())
}
