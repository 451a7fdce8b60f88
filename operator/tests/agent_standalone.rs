//! The standalone agent end to end with real packets (issue 4, run as root): policy files in
//! the lab's source directory decide verdicts; edits and deletions change them, also for an
//! open connection (semantic rule 6); an invalid file is reported with file and line and
//! disturbs nothing; `kill -9` of an agent under traffic keeps allowed flows flowing and
//! denied flows denied, and the restarted agent writes no map entry.
//!
//! Synchronisation is by digest: after every change of the source directory the test waits
//! until the agent reports the directory's digest as programmed, never by sleeping.

mod agent_support;

use agent_support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_millis(700);

/// x/a, x/b, y/a on one node; TCP echo on 80, UDP echo on 81.
const TOPOLOGY: &str = "name: agent-standalone
namespaces: {x: {ns: x}, y: {ns: y}}
pods: {x/a: {pod: a}, x/b: {pod: b}, y/a: {pod: a}}
probes:
  - {port: 80, protocol: TCP, expect: {}}
  - {port: 81, protocol: UDP, expect: {}}
";

/// NetworkPolicy in x isolating x/b for ingress, allowing TCP 80 from `from_pod` in namespace
/// `from_ns`.
fn allow_to_b(name: &str, from_ns: &str, from_pod: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: x}}
spec:
  podSelector: {{matchLabels: {{pod: b}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{ns: {from_ns}}}}}
      podSelector: {{matchLabels: {{pod: {from_pod}}}}}
    ports:
    - {{port: 80, protocol: TCP}}
"
    )
}

/// NetworkPolicy in y isolating y/a for ingress with no allow.
const ISOLATE_YA: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-a, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
";

fn matrix(lab: &moat::lab::Lab) -> Vec<(&'static str, bool)> {
    vec![
        ("x/a->x/b tcp80", tcp_reach(lab, "x/a", "x/b", 80, T)),
        ("y/a->x/b tcp80", tcp_reach(lab, "y/a", "x/b", 80, T)),
        ("x/a->x/b udp81", udp_reach(lab, "x/a", "x/b", 81, T)),
        ("x/a->y/a tcp80", tcp_reach(lab, "x/a", "y/a", 80, T)),
    ]
}

fn expect(lab: &moat::lab::Lab, want: [bool; 4], step: &str) {
    let got = matrix(lab);
    let g: Vec<bool> = got.iter().map(|(_, b)| *b).collect();
    assert_eq!(g, want, "{step}: {got:?}");
}

#[test]
fn file_edits_and_deletion_change_verdicts_also_for_open_connections() {
    let s = scenario(TOPOLOGY);
    let mut lab = up(&s, &[]);
    expect(&lab, [true, true, true, true], "no policy");

    write_source_file(&lab, "allow.yaml", &allow_to_b("allow", "x", "a"));
    lab.wait_programmed().unwrap();
    expect(&lab, [true, false, false, true], "allow x/a -> x/b:80");

    // An allowed connection, open across the next edit.
    let mut open = connect(&lab, "x/a", "x/b", 80, T).expect("allowed connect");
    assert!(echo(&mut open, b"before\n"), "open connection works");

    // Edit: the allow now names y/a instead of x/a.
    write_source_file(&lab, "allow.yaml", &allow_to_b("allow", "y", "a"));
    lab.wait_programmed().unwrap();
    assert!(
        !echo(&mut open, b"after\n"),
        "semantic rule 6: the open connection stops once its allow is removed"
    );
    expect(&lab, [false, true, false, true], "allow y/a -> x/b:80");

    // Deleting the file restores reachability.
    remove_source_file(&lab, "allow.yaml");
    lab.wait_programmed().unwrap();
    expect(&lab, [true, true, true, true], "file deleted");
    let st = status_of(&lab.agents()[0].socket);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    lab.down().unwrap();
}

#[test]
fn invalid_file_is_reported_with_line_and_disturbs_nothing() {
    let s = scenario(TOPOLOGY);
    let mut lab = up(&s, &[]);
    write_source_file(&lab, "allow.yaml", &allow_to_b("allow", "x", "a"));
    write_source_file(&lab, "isolate.yaml", ISOLATE_YA);
    lab.wait_programmed().unwrap();
    let socket = lab.agents()[0].socket.clone();
    let before = status_of(&socket);
    assert!(before.errors.is_empty(), "{:?}", before.errors);
    expect(&lab, [true, false, false, false], "both policies");

    // A new file that is not YAML at all (an unclosed flow sequence on line 3).
    write_source_file(
        &lab,
        "bad.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: [oops\n",
    );
    let st = wait_digest(&lab, &socket);
    let bad: Vec<&String> = st
        .errors
        .iter()
        .filter(|e| e.contains("bad.yaml"))
        .collect();
    assert_eq!(bad.len(), 1, "one error naming bad.yaml: {:?}", st.errors);
    assert!(bad[0].contains("line"), "the error gives the line: {bad:?}");
    assert_eq!(
        st.errors.len(),
        1,
        "nothing else is reported: {:?}",
        st.errors
    );
    expect(&lab, [true, false, false, false], "bad file beside");

    // Break a file that was in force: its last good version stays in force.
    write_source_file(&lab, "allow.yaml", "kind: NetworkPolicy\nspec: [\n");
    let st = wait_digest(&lab, &socket);
    assert!(
        st.errors
            .iter()
            .any(|e| e.contains("allow.yaml") && e.contains("line")),
        "{:?}",
        st.errors
    );
    expect(&lab, [true, false, false, false], "allow.yaml broken");

    // Other files are still applied: removing the isolation of y/a takes effect.
    remove_source_file(&lab, "isolate.yaml");
    wait_digest(&lab, &socket);
    expect(&lab, [true, false, false, true], "isolate.yaml removed");

    // Fixing everything clears the errors.
    remove_source_file(&lab, "bad.yaml");
    write_source_file(&lab, "allow.yaml", &allow_to_b("allow", "x", "a"));
    let st = wait_digest(&lab, &socket);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    expect(&lab, [true, false, false, true], "fixed");
    lab.down().unwrap();
}

#[test]
fn kill_9_under_traffic_keeps_enforcement_and_restart_writes_nothing() {
    let s = scenario(TOPOLOGY);
    let mut lab = up(&s, &[]);
    write_source_file(&lab, "allow.yaml", &allow_to_b("allow", "x", "a"));
    lab.wait_programmed().unwrap();
    let lab = &lab;

    let mut open = connect(lab, "x/a", "x/b", 80, Duration::from_secs(2)).expect("allowed");
    open.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(echo(&mut open, b"hello\n"));

    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let denied_tries = Arc::new(AtomicU64::new(0));
    std::thread::scope(|sc| {
        // Allowed established flow: an echo every 5 ms; any failure ends the thread with it.
        let allowed = {
            let (stop, echoes) = (stop.clone(), echoes.clone());
            sc.spawn(move || -> Result<Duration, String> {
                let mut worst = Duration::ZERO;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let msg = format!("seq {i}\n");
                    if !echo(&mut open, msg.as_bytes()) {
                        return Err(format!("echo {i} failed"));
                    }
                    worst = worst.max(t.elapsed());
                    echoes.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(worst)
            })
        };
        // Denied flows: fresh TCP connects from y/a, fresh UDP datagrams from x/a.
        let denied = {
            let (stop, tries) = (stop.clone(), denied_tries.clone());
            sc.spawn(move || -> Result<(), String> {
                let short = Duration::from_millis(150);
                while !stop.load(Ordering::Relaxed) {
                    if tcp_reach(lab, "y/a", "x/b", 80, short) {
                        return Err("y/a reached x/b:80".into());
                    }
                    if udp_reach(lab, "x/a", "x/b", 81, short) {
                        return Err("x/a reached x/b udp 81".into());
                    }
                    tries.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        };

        let wait_for = |counter: &AtomicU64, n: u64| {
            let base = counter.load(Ordering::Relaxed);
            poll("traffic progress", Duration::from_secs(20), || {
                (counter.load(Ordering::Relaxed) >= base + n
                    || allowed.is_finished()
                    || denied.is_finished())
                .then_some(())
            })
        };
        wait_for(&echoes, 20);
        wait_for(&denied_tries, 2);

        // kill -9 the node's agent and wait until it is gone.
        let victim = lab.agents()[0].proc.clone();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        poll("agent to die", Duration::from_secs(5), || {
            (!victim.alive()).then_some(())
        });
        // Traffic goes on without any agent.
        wait_for(&echoes, 50);
        wait_for(&denied_tries, 3);

        // Restart on the same pin root and state dir.
        let again = respawn_agent(lab, 0, &[]);
        let st = wait_digest(lab, &again.0.socket);
        assert_eq!(
            st.map_writes, 0,
            "the restarted agent rewrote {} map entries (status {st:?})",
            st.map_writes
        );
        wait_for(&echoes, 20);
        wait_for(&denied_tries, 2);
        stop.store(true, Ordering::Relaxed);
        let worst = allowed.join().unwrap().expect("allowed flow kept flowing");
        denied.join().unwrap().expect("denied flows stayed denied");
        eprintln!(
            "kill -9: {} echoes (worst round trip {worst:?}), {} denied rounds",
            echoes.load(Ordering::Relaxed),
            denied_tries.load(Ordering::Relaxed)
        );
        // The restarted agent enforces and follows changes.
        assert!(tcp_reach(lab, "x/a", "x/b", 80, T));
        remove_source_file(lab, "allow.yaml");
        wait_digest(lab, &again.0.socket);
        assert!(
            tcp_reach(lab, "y/a", "x/b", 80, T),
            "restarted agent applies edits"
        );
        drop(again);
    });
}
