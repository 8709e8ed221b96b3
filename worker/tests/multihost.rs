//! Workers on several hosts: the broker and two `taskworker`s each in their own network
//! namespace on one bridge (the test process reaches the broker over a veth link from the root
//! namespace). The broker sees two peer addresses and the work spreads over both; then one
//! worker's link is cut mid-task: the task is requeued and completes on the other worker, and
//! when the link comes back the cut-off worker's late outcome is rejected.
//!
//! Needs root and iproute2. Without them the test fails with a clear message, unless
//! `TASKD_SKIP_NETNS=1` is set, in which case it prints a loud SKIPPED line and passes.

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use support::*;
use taskd_proto::pb;
use taskd_testkit::netns::{self, NetLab};
use taskd_testkit::{Child, Taskd, binary_path, eventually};

const T: Duration = Duration::from_secs(20);

fn spawn_worker(host: &netns::Host, url: &str, id: &str, log: &std::path::Path) -> Child {
    let mut cmd = host.command(binary_path("taskworker").unwrap());
    cmd.args([
        "--broker",
        url,
        "--worker-id",
        id,
        "--concurrency",
        "2",
        "--shutdown-grace",
        "1s",
    ])
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(log).unwrap());
    Child::spawn_command("taskworker", cmd).unwrap()
}

#[tokio::test]
async fn workers_on_two_hosts_share_work_and_a_cut_off_worker_is_fenced() {
    require_binaries();
    if let Some(why) = netns::unavailable() {
        if std::env::var_os("TASKD_SKIP_NETNS").is_some() {
            eprintln!("\n=== SKIPPED multi-host test: {why} (TASKD_SKIP_NETNS is set) ===\n");
            return;
        }
        panic!("network namespaces are needed: {why}; set TASKD_SKIP_NETNS=1 to skip");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut lab = NetLab::new().unwrap();
    let broker_host = lab.add_host("broker").unwrap();
    let host1 = lab.add_host("w1").unwrap();
    let host2 = lab.add_host("w2").unwrap();

    let wrapper = ["ip", "netns", "exec", broker_host.netns.as_str()];
    let taskd = Taskd::start_wrapped(
        &wrapper,
        &format!("{}:0", broker_host.addr),
        &["--lease", "2s", "--heartbeat", "300ms", "--grace", "2s"],
    )
    .await
    .unwrap();
    let url = taskd.url();
    let (log1, log2) = (dir.path().join("w1.log"), dir.path().join("w2.log"));
    let _w1 = spawn_worker(&host1, &url, "w1", &log1);
    let _w2 = spawn_worker(&host2, &url, "w2", &log2);
    let mut c = client(&url, None).await;

    // Both workers are connected, each from its own address.
    let workers = eventually(T, "two connected workers", || {
        let mut c = c.clone();
        async move {
            let workers = c
                .list_workers(pb::ListWorkersRequest {})
                .await
                .ok()?
                .into_inner()
                .workers;
            let connected: Vec<_> = workers.into_iter().filter(|w| w.connected).collect();
            (connected.len() == 2).then_some(connected)
        }
    })
    .await
    .unwrap();
    let ips: HashSet<String> = workers
        .iter()
        .map(|w| {
            w.peer_addr
                .rsplit_once(':')
                .map(|(ip, _)| ip.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        ips,
        HashSet::from([host1.addr.clone(), host2.addr.clone()]),
        "{workers:?}"
    );

    // Work spreads over both: four slots in all, eight tasks that each hold a slot briefly.
    let specs = (0..8)
        .map(|_| exec_task(&["sh", "-c", "sleep 0.3; echo ok"]))
        .collect();
    let ids = submit(&mut c, specs).await;
    let mut ran_on = HashSet::new();
    for id in &ids {
        let done = wait_terminal(&mut c, id, T).await;
        assert_eq!(exec_result(output(&done)).stdout, b"ok\n");
        ran_on.insert(done.attempts[0].worker_id.clone());
    }
    assert_eq!(ran_on, HashSet::from(["w1".to_string(), "w2".to_string()]));

    // A task that blocks on its first run until released, and finishes at once on a rerun.
    let script = format!(
        "cd {d}; n=$(($(cat count 2>/dev/null || echo 0) + 1)); echo $n > count; \
         if [ $n -eq 1 ]; then while [ ! -e release ]; do sleep 0.05; done; echo late > finished.1; fi; \
         echo run $n",
        d = dir.path().display()
    );
    let id = submit(&mut c, vec![exec_task(&["sh", "-c", &script])])
        .await
        .remove(0);
    let running = wait_state(&mut c, &id, pb::TaskState::Running, T).await;
    let first = running.attempts[0].worker_id.clone();
    let (cut, other) = if first == "w1" {
        (&host1, "w2")
    } else {
        (&host2, "w1")
    };
    let cut_log = if first == "w1" { &log1 } else { &log2 };

    lab.set_link(cut, false).unwrap();
    let done = wait_terminal(&mut c, &id, Duration::from_secs(30)).await;
    assert_eq!(exec_result(output(&done)).stdout, b"run 2\n", "{done:?}");
    assert_eq!(done.attempts.len(), 2, "{done:?}");
    assert_eq!(done.attempts[0].worker_id, first);
    assert_eq!(done.attempts[1].worker_id, other);

    // The cut-off worker's run finishes while it is still cut off; its outcome waits...
    std::fs::write(dir.path().join("release"), b"go").unwrap();
    eventually(T, "the cut-off run to finish", || async {
        dir.path().join("finished.1").exists().then_some(())
    })
    .await
    .unwrap();
    // ... and is rejected once the link is back (stale attempt, or lost at the reconnect).
    lab.set_link(cut, true).unwrap();
    eventually(
        Duration::from_secs(40),
        "the late outcome to be rejected",
        || async {
            let log = std::fs::read_to_string(cut_log).unwrap_or_default();
            (log.contains("the broker rejected an outcome as stale")
                || log.contains("the broker no longer recognises this attempt"))
            .then_some(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "--- log of the cut-off worker {first} ---\n{}",
        std::fs::read_to_string(cut_log).unwrap_or_default()
    );
    let after = get(&mut c, &id).await;
    assert_eq!(after.state(), pb::TaskState::Succeeded);
    assert_eq!(exec_result(output(&after)).stdout, b"run 2\n", "{after:?}");
    assert_eq!(after.attempts.len(), 2);

    // The cut-off worker is back in service.
    eventually(T, "the cut-off worker to reconnect", || {
        let mut c = c.clone();
        let first = first.clone();
        async move {
            let workers = c
                .list_workers(pb::ListWorkersRequest {})
                .await
                .ok()?
                .into_inner()
                .workers;
            workers
                .iter()
                .any(|w| w.worker_id == first && w.connected)
                .then_some(())
        }
    })
    .await
    .unwrap();
}
