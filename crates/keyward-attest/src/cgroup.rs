//! `/proc/PID/cgroup` -> container id and pod UID, only from the kubelet's own hierarchy.
//!
//! The kernel writes this file and a process cannot edit it, but a process can *choose* its
//! cgroup wherever it may write: a user with a delegated subtree (systemd's `user@UID.service`
//! on cgroup v2, rootless podman) can create `…/kubepods/pod<victim UID>/<victim container id>`
//! under that subtree and move into it. Container ids and pod UIDs are world-readable in other
//! processes' cgroup files, so such a path can name any pod on the node. A name found *anywhere*
//! in the path therefore proves nothing; what proves something is *where* it is: only root (the
//! kubelet and the container runtime) can create cgroups under the kubelet's pod root.
//!
//! So a path yields a container and a pod only when it lies under one of the kubelet roots
//! ([`KubeletRoots`]: by default `/kubepods.slice` for the systemd cgroup driver and `/kubepods`
//! for the cgroupfs driver, as the host sees them), with the pod UID and the container id at
//! their fixed positions in the kubelet's layout:
//!
//! - cgroupfs driver: `ROOT[/burstable|/besteffort]/pod<UID>/<CONTAINER>` where `CONTAINER` is
//!   the 64-hex id (containerd, Docker) or `crio-<id>` (CRI-O);
//! - systemd driver (`ROOT = …/NAME.slice`):
//!   `ROOT[/NAME-burstable.slice|/NAME-besteffort.slice]/NAME[-QOS]-pod<UID with _>.slice/<RUNTIME>-<id>.scope`
//!   with `RUNTIME` one of `cri-containerd`, `crio`, `docker` (CRI-O's `crio-conmon-<id>.scope`
//!   holds its monitor, not the container, and yields nothing).
//!
//! Cgroups the container itself created below its own (a container running systemd) are still
//! that container. A path that *looks* like the kubelet's (an element named `kubepods…`, or a
//! `pod<UUID>` element) but is not under a root is refused outright
//! ([`CgroupError::OutsideKubelet`]): it is a forgery or a wrong `--cgroup-root`, and either way
//! nobody should get an identity from it. Paths are read in the host's cgroup namespace; a path
//! with `..` (read from inside another cgroup namespace) cannot be placed and gives no pod.
//!
//! The same file also gives the process's own cgroup (the unified v2 path, or the `name=systemd`
//! v1 path): [`CgroupInfo::unified`], the `unix:cgroup:` selector, which names e.g. the systemd
//! unit that started a process (`/system.slice/containerd.service`).

/// Read cgroups as the host sees them: if this process is in another cgroup namespace than
/// PID 1 (a container's own), join PID 1's. Affects the calling thread and the threads it
/// starts afterwards, so call it before starting any (the agent does, before its runtime).
/// Needs CAP_SYS_ADMIN and the host's pid namespace. `Ok(true)` when it joined.
pub fn join_host_namespace() -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let mine = std::fs::metadata("/proc/self/ns/cgroup")?.ino();
    let host = std::fs::metadata("/proc/1/ns/cgroup")?.ino();
    if mine == host {
        return Ok(false);
    }
    let ns = std::fs::File::open("/proc/1/ns/cgroup")?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWCGROUP)?;
    Ok(true)
}

/// Largest cgroup file accepted.
pub const MAX_CGROUP_FILE: usize = 64 * 1024;

/// Default kubelet pod roots: the systemd driver's and the cgroupfs driver's.
pub const DEFAULT_KUBELET_ROOTS: [&str; 2] = ["/kubepods.slice", "/kubepods"];

/// What the cgroup paths say about the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Container id (64 lowercase hex digits), when the process runs in a container of a pod,
    /// under the kubelet's root.
    pub container_id: Option<String>,
    /// Pod UID (lowercase, `-` separated), with the container.
    pub pod_uid: Option<String>,
    /// The process's cgroup: the unified (v2) path, or else the v1 `name=systemd` path.
    pub unified: Option<String>,
}

/// Why a cgroup file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// Not a cgroup file.
    #[error("malformed cgroup file: {0}")]
    Malformed(&'static str),
    /// Lines under the kubelet root disagree about the container or pod.
    #[error("the process's cgroups name more than one {0}")]
    Ambiguous(&'static str),
    /// A kubelet-like path outside the kubelet's root: a cgroup someone named to look like a
    /// pod's (or a kubelet root the agent was not told about: see `--cgroup-root`).
    #[error("cgroup outside kubelet hierarchy: {0} is not under the kubelet's pod root {1}")]
    OutsideKubelet(String, String),
    /// Under the kubelet root, but not in the kubelet's layout.
    #[error("cgroup under the kubelet root in an unknown layout: {0}")]
    UnknownLayout(String),
    /// A kubelet-like path read from inside another cgroup namespace (`..` elements): it
    /// cannot be placed. The agent must read cgroups in the host's cgroup namespace.
    #[error("cgroup {0} cannot be placed: the agent does not see the host's cgroup namespace (run it with the host's)")]
    Unplaceable(String),
}

impl CgroupError {
    /// A short, stable reason for audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed cgroup file",
            Self::Ambiguous(_) => "ambiguous cgroups",
            Self::OutsideKubelet(..) => "cgroup outside kubelet hierarchy",
            Self::UnknownLayout(_) => "cgroup in an unknown kubelet layout",
            Self::Unplaceable(_) => "cgroup outside the agent's view",
        }
    }
}

/// The kubelet pod roots, as absolute cgroup paths in the host's cgroup namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletRoots(Vec<Root>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Root {
    /// Path elements.
    elements: Vec<String>,
    /// systemd driver: the slice's name without `.slice` (`kubepods`, `kubelet-kubepods`).
    systemd: Option<String>,
}

impl Default for KubeletRoots {
    fn default() -> Self {
        Self::new(DEFAULT_KUBELET_ROOTS).unwrap_or(Self(Vec::new()))
    }
}

impl KubeletRoots {
    /// Roots given as absolute cgroup paths (`/kubepods.slice`, `/kubelet.slice/kubelet-kubepods.slice`).
    pub fn new<S: AsRef<str>>(paths: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let mut out = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let elements: Vec<String> = p.split('/').filter(|e| !e.is_empty()).map(str::to_string).collect();
            if !p.starts_with('/') || elements.is_empty() || elements.iter().any(|e| e == "." || e == "..") {
                return Err(format!("{p:?} is not an absolute cgroup path such as /kubepods.slice"));
            }
            let last = elements.last().map(String::as_str).unwrap_or_default();
            let systemd = last.strip_suffix(".slice").map(str::to_string);
            out.push(Root { elements, systemd });
        }
        Ok(Self(out))
    }

    fn describe(&self) -> String {
        let v: Vec<String> = self.0.iter().map(|r| format!("/{}", r.elements.join("/"))).collect();
        v.join(" or ")
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A whole element that is a UUID written with `sep` separators (8-4-4-4-12 hex), normalised to
/// `-` and lowercase.
fn uuid(s: &str, sep: u8) -> Option<String> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = String::with_capacity(36);
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != sep {
                return None;
            }
            out.push('-');
        } else if c.is_ascii_hexdigit() {
            out.push(char::from(c.to_ascii_lowercase()));
        } else {
            return None;
        }
    }
    Some(out)
}

/// Whether an element looks like the kubelet's (outside a root, that is a forgery).
fn kubelet_like(element: &str) -> bool {
    if element.starts_with("kubepods") || element.contains("-kubepods") {
        return true;
    }
    // `pod<UUID>` anywhere in the element, with either separator.
    element
        .match_indices("pod")
        .any(|(i, _)| element.get(i + 3..i + 39).is_some_and(|u| uuid(u, b'-').is_some() || uuid(u, b'_').is_some()))
}

/// (pod UID, container id) of the part of a path below a cgroupfs-driver root; `None` for a
/// pod-level or unknown path.
fn cgroupfs_layout(rest: &[&str]) -> Option<(String, String)> {
    let rest = match rest.first() {
        Some(&("burstable" | "besteffort")) => &rest[1..],
        _ => rest,
    };
    let pod = uuid(rest.first()?.strip_prefix("pod")?, b'-')?;
    let c = *rest.get(1)?;
    let id = c.strip_prefix("crio-").unwrap_or(c);
    is_hex64(id).then(|| (pod, id.to_string()))
}

/// The same below a systemd-driver root named `name` (`kubepods`).
fn systemd_layout(name: &str, rest: &[&str]) -> Option<(String, String)> {
    let (pod_slice, rest) = match rest.first()?.strip_prefix(name).and_then(|s| s.strip_prefix('-')) {
        Some(q @ ("burstable.slice" | "besteffort.slice")) => {
            let qos = q.strip_suffix(".slice")?;
            let pod = rest.get(1)?.strip_prefix(name)?.strip_prefix('-')?.strip_prefix(qos)?.strip_prefix('-')?;
            (pod, &rest[2..])
        }
        Some(pod) => (pod, &rest[1..]),
        None => return None,
    };
    let pod = uuid(pod_slice.strip_prefix("pod")?.strip_suffix(".slice")?, b'_')?;
    let scope = rest.first()?.strip_suffix(".scope")?;
    let id = ["cri-containerd-", "crio-", "docker-"].iter().find_map(|p| scope.strip_prefix(p))?;
    is_hex64(id).then(|| (pod, id.to_string()))
}

/// Parse the contents of `/proc/PID/cgroup` against the kubelet's roots.
pub fn parse(contents: &str, roots: &KubeletRoots) -> Result<CgroupInfo, CgroupError> {
    if contents.len() > MAX_CGROUP_FILE {
        return Err(CgroupError::Malformed("file too large"));
    }
    let mut info = CgroupInfo::default();
    let mut systemd_v1 = None;
    let mut any = false;
    for line in contents.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(hier), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CgroupError::Malformed("a line is not HIERARCHY:CONTROLLERS:PATH"));
        };
        if hier.parse::<u32>().is_err() || !path.starts_with('/') {
            return Err(CgroupError::Malformed("a line has no numeric hierarchy or no absolute path"));
        }
        any = true;
        if hier == "0" && controllers.is_empty() {
            info.unified = Some(path.to_string());
        } else if controllers == "name=systemd" {
            systemd_v1 = Some(path.to_string());
        }
        let elements: Vec<&str> = path.split('/').filter(|e| !e.is_empty()).collect();
        if elements.contains(&"..") {
            // Read from inside another cgroup namespace: cannot be placed. A host process is
            // just that; one that looks like a pod's is refused rather than guessed.
            if elements.iter().any(|e| kubelet_like(e)) {
                return Err(CgroupError::Unplaceable(path.to_string()));
            }
            continue;
        }
        let found = roots.0.iter().find_map(|r| {
            let under = elements.len() >= r.elements.len() && elements.iter().zip(&r.elements).all(|(a, b)| a == b);
            under.then(|| (r, &elements[r.elements.len()..]))
        });
        let Some((root, rest)) = found else {
            if elements.iter().any(|e| kubelet_like(e)) {
                return Err(CgroupError::OutsideKubelet(path.to_string(), roots.describe()));
            }
            continue;
        };
        let qos_level = |e: &str| match &root.systemd {
            Some(name) => {
                e.strip_prefix(name.as_str()).is_some_and(|q| q == "-burstable.slice" || q == "-besteffort.slice")
            }
            None => e == "burstable" || e == "besteffort",
        };
        if rest.is_empty() || (rest.len() == 1 && qos_level(rest[0])) {
            // The root itself or a QoS level: kubelet's own processes, no pod.
            continue;
        }
        let ids = match &root.systemd {
            Some(name) => systemd_layout(name, rest),
            None => cgroupfs_layout(rest),
        };
        let Some((pod, container)) = ids else {
            return Err(CgroupError::UnknownLayout(path.to_string()));
        };
        match (&info.container_id, &info.pod_uid) {
            (Some(c), _) if *c != container => return Err(CgroupError::Ambiguous("container")),
            (_, Some(p)) if *p != pod => return Err(CgroupError::Ambiguous("pod")),
            _ => {
                info.container_id = Some(container);
                info.pod_uid = Some(pod);
            }
        }
    }
    if !any {
        return Err(CgroupError::Malformed("no cgroup lines"));
    }
    if info.unified.as_deref().is_none_or(|u| u == "/") && systemd_v1.is_some() {
        // Hybrid hierarchy with an unused unified tree: systemd's v1 tree says where it is.
        info.unified = systemd_v1;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const ID2: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";

    fn roots() -> KubeletRoots {
        KubeletRoots::default()
    }

    fn ok(s: &str) -> CgroupInfo {
        parse(s, &roots()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn pod(s: &str) -> (Option<String>, Option<String>) {
        let i = ok(s);
        (i.pod_uid, i.container_id)
    }

    fn both() -> (Option<String>, Option<String>) {
        (Some(UID.into()), Some(ID.into()))
    }

    #[test]
    fn kubelet_layouts() {
        // cgroup v2, systemd driver: containerd, CRI-O, Docker; every QoS class.
        for runtime in ["cri-containerd", "crio", "docker"] {
            for (qos_slice, qos) in
                [("kubepods-burstable.slice/", "-burstable"), ("kubepods-besteffort.slice/", "-besteffort"), ("", "")]
            {
                let p = format!("0::/kubepods.slice/{qos_slice}kubepods{qos}-pod{UID_}.slice/{runtime}-{ID}.scope\n");
                assert_eq!(pod(&p), both(), "{p}");
            }
        }
        // A cgroup the container made below its own is still the container.
        assert_eq!(
            pod(&format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/init.scope")),
            both()
        );
        // cgroup v1, cgroupfs driver, several controllers agreeing (containerd/Docker raw id).
        let v1 = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(pod(&v1), both());
        // Guaranteed QoS; CRI-O on cgroupfs.
        assert_eq!(pod(&format!("0::/kubepods/pod{UID}/{ID}")), both());
        assert_eq!(pod(&format!("0::/kubepods/besteffort/pod{UID}/crio-{ID}")), both());
        // Another root, given by the operator (kubelet --cgroup-root).
        let custom = KubeletRoots::new(["/kubelet.slice/kubelet-kubepods.slice"]).unwrap();
        let p = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        let i = parse(&p, &custom).unwrap();
        assert_eq!((i.pod_uid, i.container_id), both());
        // Hosts and plain containers: no pod, no container id.
        assert_eq!(pod("0::/user.slice/user-1000.slice/session-3.scope\n"), (None, None));
        assert_eq!(pod(&format!("0::/system.slice/docker-{ID}.scope")), (None, None));
        assert_eq!(pod(&format!("12:pids:/docker/{ID}")), (None, None));
        assert_eq!(pod("0::/\n"), (None, None));
        // The kubelet's own levels.
        assert_eq!(pod("0::/kubepods.slice/kubepods-burstable.slice"), (None, None));
        // CRI-O's monitor is not the container.
        let conmon = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope");
        assert!(matches!(parse(&conmon, &roots()), Err(CgroupError::UnknownLayout(_))));
    }

    #[test]
    fn forged_paths_outside_the_root_are_refused() {
        let forged = [
            // A delegated user subtree shaped like each driver's layout.
            format!("0::/user.slice/user-1000.slice/user@1000.service/kubepods/burstable/pod{UID}/{ID}"),
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            // Just a pod element somewhere.
            format!("0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}/{ID}"),
            format!("0::/user.slice/user-1000.slice/user@1000.service/x-pod{UID_}.slice/{ID}"),
            // The root's name, one level down.
            format!("0::/system.slice/kubepods/pod{UID}/{ID}"),
        ];
        for f in &forged {
            let e = parse(f, &roots()).unwrap_err();
            assert!(matches!(e, CgroupError::OutsideKubelet(..)), "{f}: {e}");
            assert_eq!(e.reason(), "cgroup outside kubelet hierarchy");
        }
        // A forged line beside a real one is refused too (hybrid hierarchies).
        let mixed = format!(
            "4:memory:/kubepods/pod{UID}/{ID}\n0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod{UID}/{ID}\n"
        );
        assert!(matches!(parse(&mixed, &roots()), Err(CgroupError::OutsideKubelet(..))));
        // A relative path (another cgroup namespace) is never placed.
        assert!(matches!(
            parse(&format!("0::/../../kubepods/pod{UID}/{ID}"), &roots()),
            Err(CgroupError::Unplaceable(_))
        ));
        assert_eq!(pod("0::/../../user.slice/session-1.scope"), (None, None));
    }

    #[test]
    fn layout_refusals() {
        let bad = [
            format!("0::/kubepods/pod{UID}/{}", &ID[..63]),
            format!("0::/kubepods/pod{UID}/{}", ID.to_uppercase()),
            format!("0::/kubepods/pod{UID}0/{ID}"),
            format!("0::/kubepods/guaranteed/pod{UID}/{ID}"),
            format!("0::/kubepods/pod{UID}"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"),
            format!("0::/kubepods.slice/kubepods-pod{UID}.slice/crio-{ID}.scope"),
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/runc-{ID}.scope"),
        ];
        for b in &bad {
            assert!(matches!(parse(b, &roots()), Err(CgroupError::UnknownLayout(_))), "{b}");
        }
        assert_eq!(
            parse(&format!("1:cpu:/kubepods/pod{UID}/{ID}\n2:memory:/kubepods/pod{UID}/{ID2}\n"), &roots()),
            Err(CgroupError::Ambiguous("container"))
        );
        let other = "3c48913c-b29f-11e7-9350-020968147796";
        assert_eq!(
            parse(&format!("1:cpu:/kubepods/pod{UID}/{ID}\n2:memory:/kubepods/pod{other}/{ID}\n"), &roots()),
            Err(CgroupError::Ambiguous("pod"))
        );
        for bad in ["", "garbage", "x:y:/a", "0::relative", "0:"] {
            assert!(parse(bad, &roots()).is_err(), "{bad:?}");
        }
        assert!(parse(&"0::/a\n".repeat(20_000), &roots()).is_err(), "size limit");
        for bad in ["kubepods", "/", "/a/../b", ""] {
            assert!(KubeletRoots::new([bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_process_cgroup() {
        assert_eq!(
            ok("0::/system.slice/containerd.service\n").unified.as_deref(),
            Some("/system.slice/containerd.service")
        );
        // Hybrid: the unified tree unused, systemd's v1 tree says.
        let hybrid = "9:name=systemd:/system.slice/containerd.service\n4:memory:/x\n0::/\n";
        assert_eq!(ok(hybrid).unified.as_deref(), Some("/system.slice/containerd.service"));
        assert_eq!(ok("4:memory:/x\n").unified, None);
    }

    /// A path in one of the kubelet's layouts, from its parts.
    fn layout(systemd: bool, qos: usize, runtime: usize, uid: &str, id: &str, extra: &str) -> String {
        let q = ["", "burstable", "besteffort"][qos % 3];
        if systemd {
            let rt = ["cri-containerd", "crio", "docker"][runtime % 3];
            let u = uid.replace('-', "_");
            let (qs, qp) = if q.is_empty() {
                (String::new(), String::new())
            } else {
                (format!("kubepods-{q}.slice/"), format!("-{q}"))
            };
            format!("/kubepods.slice/{qs}kubepods{qp}-pod{u}.slice/{rt}-{id}.scope{extra}")
        } else {
            let c = if runtime.is_multiple_of(2) { id.to_string() } else { format!("crio-{id}") };
            let qs = if q.is_empty() { String::new() } else { format!("{q}/") };
            format!("/kubepods/{qs}pod{uid}/{c}{extra}")
        }
    }

    proptest::proptest! {
        /// Every driver, QoS class and runtime, on cgroup v1 (several controllers) and v2: the
        /// pod and container come back exactly.
        #[test]
        fn every_layout_round_trips(
            systemd in proptest::bool::ANY,
            qos in 0usize..3,
            runtime in 0usize..3,
            v1 in proptest::bool::ANY,
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            id in "[0-9a-f]{64}",
            extra in proptest::option::of("/[a-z]{1,8}\\.scope"),
        ) {
            let path = layout(systemd, qos, runtime, &uid, &id, extra.as_deref().unwrap_or(""));
            let file = if v1 { format!("12:memory:{path}\n4:pids:{path}\n1:name=systemd:{path}\n") } else { format!("0::{path}\n") };
            let i = parse(&file, &roots()).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{file}: {e}")))?;
            proptest::prop_assert_eq!(i.pod_uid.as_deref(), Some(uid.as_str()));
            proptest::prop_assert_eq!(i.container_id.as_deref(), Some(id.as_str()));
        }

        /// The same paths under any other prefix are refused, never read as a pod.
        #[test]
        fn every_layout_elsewhere_is_refused(
            systemd in proptest::bool::ANY,
            qos in 0usize..3,
            runtime in 0usize..3,
            prefix in "(/[a-z@0-9.-]{1,12}){1,4}",
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            id in "[0-9a-f]{64}",
        ) {
            proptest::prop_assume!(!prefix.starts_with("/kubepods"));
            let file = format!("0::{prefix}{}\n", layout(systemd, qos, runtime, &uid, &id, ""));
            let r = parse(&file, &roots());
            proptest::prop_assert!(
                matches!(r, Err(CgroupError::OutsideKubelet(..) | CgroupError::Unplaceable(_))),
                "{}: {:?}", file, r
            );
        }

        /// Arbitrary input never panics, and whatever is returned is well-formed.
        #[test]
        fn arbitrary_input(s in "(([0-9]{1,2}|x):[a-z,=]{0,10}:/[a-zA-Z0-9_./-]{0,120}\n){0,6}") {
            if let Ok(info) = parse(&s, &roots()) {
                if let Some(c) = info.container_id { proptest::prop_assert!(is_hex64(&c)); }
                if let Some(p) = info.pod_uid { proptest::prop_assert_eq!(p.len(), 36); }
            }
        }

        #[test]
        fn arbitrary_bytes(s in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse(&String::from_utf8_lossy(&s), &roots());
        }
    }
}
