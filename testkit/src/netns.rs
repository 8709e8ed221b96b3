//! Several "hosts" on one machine: network namespaces joined by veth links to a bridge, for
//! tests of what crosses a network (peer addresses, cut links).
//!
//! [`NetLab::new`] creates a switch namespace holding a bridge, plus a veth link from the root
//! namespace (so the test process itself reaches every host) on a private /24 in
//! `10.201.0.0/16` that it picks and checks is unused. [`NetLab::add_host`] adds a namespace
//! with one address on that /24. Everything is named with the test's pid and deleted when the
//! lab is dropped (also on panic); leftovers of dead test processes are removed on the next
//! start. Needs root and `ip` (iproute2).

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Prefix of every namespace a lab creates: `tkl-<pid>-<name>`.
const NS_PREFIX: &str = "tkl-";

/// Runs `ip args...`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why network namespaces cannot be used here, or `None` when they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need CAP_NET_ADMIN)".into());
    }
    if let Err(e) = ip_output(&["netns", "list"]) {
        return Some(format!("`ip netns` is not usable: {e:#}"));
    }
    let probe = format!("{NS_PREFIX}{}-probe", std::process::id());
    if let Err(e) = ip(&["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e:#}"));
    }
    let _ = ip(&["netns", "del", &probe]);
    None
}

/// One namespace ("host") of a lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace's name.
    pub netns: String,
    /// Its interface (inside the namespace).
    pub iface: String,
    /// The switch-side end of its link (inside the switch namespace).
    pub switch_port: String,
    /// Its IPv4 address.
    pub addr: String,
}

impl Host {
    /// A command that runs `program` inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }
}

/// A set of namespaces on one bridge, deleted on drop.
#[derive(Debug)]
pub struct NetLab {
    tag: String,
    switch: String,
    /// The root namespace's end of its link to the switch.
    host_iface: String,
    subnet: u8,
    hosts: Vec<Host>,
    namespaces: Vec<String>,
}

impl NetLab {
    /// Creates the switch namespace and the link from the root namespace.
    pub fn new() -> Result<NetLab> {
        cleanup_stale();
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let subnet = pick_subnet(pid)?;
        let switch = format!("{NS_PREFIX}{pid}-sw");
        let mut lab = NetLab {
            host_iface: format!("tk{tag}h"),
            tag,
            switch: switch.clone(),
            subnet,
            hosts: Vec::new(),
            namespaces: Vec::new(),
        };
        ip(&["netns", "add", &switch])?;
        lab.namespaces.push(switch.clone());
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        let port = format!("{}s", lab.host_iface);
        ip(&[
            "link",
            "add",
            &lab.host_iface,
            "type",
            "veth",
            "peer",
            "name",
            &port,
        ])?;
        lab.plug(&port)?;
        let cidr = format!("{}/24", lab.address(1));
        ip(&["addr", "add", &cidr, "dev", &lab.host_iface])?;
        ip(&["link", "set", &lab.host_iface, "up"])?;
        Ok(lab)
    }

    /// The address `10.201.<subnet>.<n>`.
    pub fn address(&self, n: u8) -> String {
        format!("10.201.{}.{n}", self.subnet)
    }

    /// The root namespace's address on the lab's network.
    pub fn root_addr(&self) -> String {
        self.address(1)
    }

    /// Moves switch port `port` (in the root namespace) into the switch and onto its bridge.
    fn plug(&self, port: &str) -> Result<()> {
        ip(&["link", "set", port, "netns", &self.switch])?;
        ip(&["-n", &self.switch, "link", "set", port, "master", "br0"])?;
        ip(&["-n", &self.switch, "link", "set", port, "up"])
    }

    /// Adds a namespace `name` linked to the switch, with the next free address.
    pub fn add_host(&mut self, name: &str) -> Result<Host> {
        let index = self.hosts.len() + 2;
        let n = u8::try_from(index).context("too many hosts")?;
        let netns = format!("{NS_PREFIX}{}-{name}", std::process::id());
        let iface = format!("tk{}n{index}", self.tag);
        let switch_port = format!("{iface}s");
        ip(&["netns", "add", &netns])?;
        self.namespaces.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "link",
            "add",
            &iface,
            "type",
            "veth",
            "peer",
            "name",
            &switch_port,
        ])?;
        ip(&["link", "set", &iface, "netns", &netns])?;
        self.plug(&switch_port)?;
        let addr = self.address(n);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &iface,
        ])?;
        ip(&["-n", &netns, "link", "set", &iface, "up"])?;
        let host = Host {
            netns,
            iface,
            switch_port,
            addr,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Cuts (`up = false`) or restores the link of `host` at the switch: packets are dropped
    /// silently, as with a pulled cable.
    pub fn set_link(&self, host: &Host, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch, "link", "set", &host.switch_port, state])
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth ends, and with them their peers.
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.host_iface]);
    }
}

/// A /24 in 10.201.0.0/16 that no interface or route of the root namespace uses yet.
fn pick_subnet(pid: u32) -> Result<u8> {
    let routes = ip_output(&["-4", "route", "show", "table", "all"]).unwrap_or_default()
        + &ip_output(&["-4", "addr", "show"]).unwrap_or_default();
    for i in 0..250u32 {
        let subnet = u8::try_from((pid + i) % 250 + 1).unwrap_or(1);
        if !routes.contains(&format!("10.201.{subnet}.")) {
            return Ok(subnet);
        }
    }
    bail!("no free /24 in 10.201.0.0/16")
}

/// Deletes namespaces left by lab processes that no longer run (e.g. killed test runs).
fn cleanup_stale() {
    let Ok(list) = ip_output(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
