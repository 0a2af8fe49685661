//! What every scenario produces, and where it goes: `<out>/<scenario>.json` (the numbers),
//! `<out>/<scenario>.md` (a table) and SVG plots beside them. `meshwork lab report` reads the
//! JSON files back, never the Markdown.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// Real processes in network namespaces, links capped with `tc`.
    Netns,
    /// Everything in one process over loopback, with application-level caps.
    Inproc,
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunnerKind::Netns => "netns",
            RunnerKind::Inproc => "inproc",
        })
    }
}

impl FromStr for RunnerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "netns" => Ok(RunnerKind::Netns),
            "inproc" => Ok(RunnerKind::Inproc),
            other => Err(format!("unknown runner {other:?}: use netns or inproc")),
        }
    }
}

pub struct Outputs {
    pub json: serde_json::Value,
    pub markdown: String,
    /// (file name, SVG text).
    pub svgs: Vec<(String, String)>,
}

impl Outputs {
    /// Writes the three kinds of output; returns the JSON file's path.
    pub fn write(&self, out: &Path, name: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
        let json = out.join(format!("{name}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(&self.json)?)
            .with_context(|| json.display().to_string())?;
        std::fs::write(out.join(format!("{name}.md")), &self.markdown)?;
        for (file, svg) in &self.svgs {
            std::fs::write(out.join(file), svg)?;
        }
        Ok(json)
    }
}
