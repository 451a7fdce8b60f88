//! A running lab: namespaces, servers, optional agents; torn down on drop.

use super::agents::{self, Agent, AgentSpec};
use super::ext::{self, Family, LabScenario};
use super::plan::LabPlan;
use super::probe::{self, ProbeOptions, ProbeReport};
use super::servers::Servers;
use super::source::SourceDir;
use super::state::{self, LabState, Proc, SweepMode};
use super::{LabError, LabOptions, netlink, netns};
use std::time::Duration;

/// A lab. Built by [`Lab::up`], removed by [`Lab::down`] or, on any other path (an error, a
/// panic), by drop. Drop it from synchronous code only (it stops a tokio runtime).
pub struct Lab {
    plan: LabPlan,
    opts: LabOptions,
    state: LabState,
    servers: Option<Servers>,
    source: Option<SourceDir>,
    agents: Vec<Agent>,
    down: bool,
}

impl Lab {
    /// Build the lab for `scenario`: sweep stale labs, record the state, create namespaces
    /// and links, start the servers, and (with agents) write the source directory, start one
    /// agent per node and wait until all of them report the scenario's policies programmed.
    pub fn up(scenario: &LabScenario, opts: &LabOptions) -> Result<Lab, LabError> {
        if opts.sweep_stale {
            state::sweep(SweepMode::Stale, &opts.bpffs)?;
        }
        let id = LabPlan::new_id();
        let plan = LabPlan::new(&id, scenario)?;
        let state = LabState {
            id: id.clone(),
            owner: Some(Proc::current()),
            scenario: scenario.name().to_string(),
            netns: plan.all_netns(),
            pin_roots: if opts.agent.is_some() {
                plan.nodes
                    .iter()
                    .map(|n| plan.pin_root(&opts.bpffs, n))
                    .collect()
            } else {
                Vec::new()
            },
            source_dir: None,
            agents: Vec::new(),
        };
        state.save()?;
        let mut lab = Lab {
            plan,
            opts: opts.clone(),
            state,
            servers: None,
            source: None,
            agents: Vec::new(),
            down: false,
        };
        // From here on, an early return drops `lab`, which removes whatever exists.
        for n in lab.plan.all_netns().iter().rev() {
            netns::add(n)?;
        }
        netlink::build(&lab.plan)?;
        netlink::wait_running(&lab.plan, Duration::from_secs(10))?;
        let servers = Servers::new()?;
        for p in &lab.plan.pods {
            servers.start(Some(&p.netns), &p.servers)?;
        }
        lab.servers = Some(servers);
        if lab.opts.agent.is_some() {
            lab.start_agents(scenario)?;
        }
        Ok(lab)
    }

    fn start_agents(&mut self, scenario: &LabScenario) -> Result<(), LabError> {
        let cfg = self.opts.agent.clone().expect("checked by caller");
        let source = SourceDir::create(&self.plan.id)?;
        self.state.source_dir = Some(source.path().to_path_buf());
        self.state.save()?;
        source.write_endpoints(&self.plan)?;
        source.write_policies(&self.resolve_policies(&scenario.base.policies)?)?;
        self.source = Some(source);
        let runtime_dir = LabState::runtime_dir(&self.plan.id);
        for node in &self.plan.nodes {
            let pin_root = self.plan.pin_root(&self.opts.bpffs, node);
            let a = agents::spawn(
                &cfg,
                &AgentSpec {
                    node: &node.name,
                    netns: &node.netns,
                    source_dir: self.source.as_ref().expect("set above").path(),
                    pin_root: &pin_root,
                    runtime_dir: &runtime_dir,
                },
            )?;
            self.state.agents.push(a.proc.clone());
            self.agents.push(a);
            self.state.save()?;
        }
        self.wait_programmed()
    }

    /// Wait until every agent has programmed the source directory as it is now.
    pub fn wait_programmed(&mut self) -> Result<(), LabError> {
        let (Some(cfg), Some(source)) = (self.opts.agent.clone(), self.source.as_ref()) else {
            return Ok(());
        };
        let digest = agents::source_digest(source.path())?;
        agents::wait_programmed(&cfg, &mut self.agents, &digest)
    }

    /// Resolve placeholders in policy objects against this lab's pod addresses.
    pub fn resolve_policies(
        &self,
        policies: &[serde_json::Value],
    ) -> Result<Vec<serde_json::Value>, LabError> {
        ext::resolve_policies(policies, &|p| self.plan.ip_of(p, Family::IPv4), &|p| {
            self.plan.ip_of(p, Family::IPv6)
        })
    }

    /// Swap the policies (rewrite the policy files) and wait until every agent programmed
    /// them. Without agents this only validates them.
    pub fn set_policies(&mut self, policies: &[serde_json::Value]) -> Result<(), LabError> {
        let resolved = self.resolve_policies(policies)?;
        if let Some(source) = &self.source {
            source.write_policies(&resolved)?;
            self.wait_programmed()?;
        }
        Ok(())
    }

    /// Probe every ordered pod pair for every probe of `scenario`.
    pub fn probe(
        &self,
        scenario: &LabScenario,
        opts: &ProbeOptions,
    ) -> Result<ProbeReport, LabError> {
        probe::run(&self.plan, scenario, opts)
    }

    pub fn plan(&self) -> &LabPlan {
        &self.plan
    }

    pub fn id(&self) -> &str {
        &self.plan.id
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The source directory the agents read (None without agents).
    pub fn source_dir(&self) -> Option<&std::path::Path> {
        self.source.as_ref().map(|s| s.path())
    }

    /// Tear down: stop agents (SIGTERM, then SIGKILL), stop the servers, delete the
    /// namespaces, remove pin roots, the source and runtime directories, and the state file.
    pub fn down(mut self) -> Result<(), LabError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        for a in &mut self.agents {
            a.stop(Duration::from_secs(5));
        }
        self.agents.clear();
        // Closing the sockets releases the namespaces they hold.
        self.servers.take();
        self.source.take();
        self.state.destroy()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("moat lab {}: teardown: {e}", self.plan.id);
        }
    }
}
