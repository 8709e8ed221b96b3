//! The network lab helper: hosts on one bridge reach the root namespace over the lab network,
//! a cut link isolates a host until it is restored, and everything is gone after drop.
//!
//! Needs root, iproute2 and bash (for `/dev/tcp`). Without namespaces the test fails with a
//! clear message, unless `TASKD_SKIP_NETNS=1` is set, in which case it prints a loud SKIPPED
//! line and passes.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use taskd_testkit::netns::{self, NetLab};

/// How long a link that is up may take to carry a connection, on a loaded machine.
const UP_BOUND: Duration = Duration::from_secs(15);

/// Whether `host` can open a TCP connection to `addr:port` (bash's /dev/tcp, 2 s bound).
fn can_connect(host: &netns::Host, addr: &str, port: u16) -> bool {
    let mut cmd = host.command("timeout");
    cmd.args([
        "2",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{addr}/{port}"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// Whether `host` can connect within `bound`, trying again while it cannot: a link that was
/// just set up (or restored) may take a moment to forward (carrier, bridge port state, ARP).
fn connects_within(host: &netns::Host, addr: &str, port: u16, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if can_connect(host, addr, port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hosts_reach_the_lab_network_until_a_link_is_cut() {
    if let Some(why) = netns::unavailable() {
        if std::env::var_os("TASKD_SKIP_NETNS").is_some() {
            eprintln!("\n=== SKIPPED netlab test: {why} (TASKD_SKIP_NETNS is set) ===\n");
            return;
        }
        panic!("network namespaces are needed: {why}; set TASKD_SKIP_NETNS=1 to skip");
    }
    let names;
    {
        let mut lab = NetLab::new().unwrap();
        let a = lab.add_host("a").unwrap();
        let b = lab.add_host("b").unwrap();
        names = (a.netns.clone(), b.netns.clone());
        assert_ne!(a.addr, b.addr);

        // The root namespace listens on its lab address; both hosts reach it over the bridge.
        let listener = TcpListener::bind((lab.root_addr().as_str(), 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(connects_within(&a, &lab.root_addr(), port, UP_BOUND));
        assert!(connects_within(&b, &lab.root_addr(), port, UP_BOUND));

        lab.set_link(&a, false).unwrap();
        assert!(
            !can_connect(&a, &lab.root_addr(), port),
            "a cut link isolates a"
        );
        assert!(can_connect(&b, &lab.root_addr(), port), "b is not affected");
        lab.set_link(&a, true).unwrap();
        assert!(
            connects_within(&a, &lab.root_addr(), port, UP_BOUND),
            "a restored link reconnects a"
        );
    }
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.contains(&names.0) && !list.contains(&names.1),
        "{list}"
    );
}
