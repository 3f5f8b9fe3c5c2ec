//! `/proc/PID/cgroup` -> container id and pod UID.
//!
//! The kernel writes this file and a workload cannot forge it (unlike `mountinfo`, which
//! follows the workload's mount namespace). Each line is `HIERARCHY:CONTROLLERS:PATH` (cgroup v1)
//! or `0::PATH` (v2). Kubernetes puts the pod UID and the container id in the path, in one of
//! these shapes (with cgroup namespaces the path may be relative, `/../../pod.../ID`):
//!
//! - cgroupfs driver: `/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/<64 hex>`
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_….slice/cri-containerd-<64 hex>.scope`
//!   (systemd writes the UID with `_`; it is converted back to `-`)
//! - CRI-O: `…/crio-<64 hex>.scope`; Docker: `/docker/<64 hex>` or `docker-<64 hex>.scope`
//!
//! The container id is the last path element, stripped of `.scope` and of a `word-` prefix, and
//! must be 64 lowercase hex digits. The pod UID is a UUID following `pod` in any element. Lines
//! that name different containers or pods are an error rather than a guess.

/// Largest cgroup file accepted.
pub const MAX_CGROUP_FILE: usize = 64 * 1024;

/// What the cgroup paths say about the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Container id (64 lowercase hex digits), when the process runs in a container.
    pub container_id: Option<String>,
    /// Pod UID (lowercase, `-` separated), when the container belongs to a Kubernetes pod.
    pub pod_uid: Option<String>,
}

/// Why a cgroup file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// Not a cgroup file.
    #[error("malformed cgroup file: {0}")]
    Malformed(&'static str),
    /// Lines disagree about the container or pod.
    #[error("the process's cgroups name more than one {0}")]
    Ambiguous(&'static str),
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A UUID written with `-` or `_` separators (8-4-4-4-12 hex), normalised to `-` and lowercase.
fn uuid_at(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.len() < 36 {
        return None;
    }
    let mut out = String::with_capacity(36);
    for (i, &c) in b[..36].iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' && c != b'_' {
                return None;
            }
            out.push('-');
        } else if c.is_ascii_hexdigit() {
            out.push(char::from(c.to_ascii_lowercase()));
        } else {
            return None;
        }
    }
    // The UUID must end the element's UUID part: nothing hex-like may follow directly.
    match b.get(36) {
        Some(c) if c.is_ascii_hexdigit() || *c == b'-' || *c == b'_' => None,
        _ => Some(out),
    }
}

fn pod_uid_in(element: &str) -> Option<String> {
    let mut rest = element;
    while let Some(i) = rest.find("pod") {
        if let Some(u) = uuid_at(&rest[i + 3..]) {
            return Some(u);
        }
        rest = &rest[i + 3..];
    }
    None
}

fn container_id_in(last: &str) -> Option<String> {
    let name = last.strip_suffix(".scope").unwrap_or(last);
    let id = match name.rfind('-') {
        Some(i) => &name[i + 1..],
        None => name,
    };
    is_hex64(id).then(|| id.to_string())
}

/// Parse the contents of `/proc/PID/cgroup`.
pub fn parse(contents: &str) -> Result<CgroupInfo, CgroupError> {
    if contents.len() > MAX_CGROUP_FILE {
        return Err(CgroupError::Malformed("file too large"));
    }
    let mut info = CgroupInfo::default();
    let mut any = false;
    for line in contents.lines().filter(|l| !l.is_empty()) {
        let mut parts = line.splitn(3, ':');
        let (Some(hier), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CgroupError::Malformed("a line is not HIERARCHY:CONTROLLERS:PATH"));
        };
        if hier.parse::<u32>().is_err() || !path.starts_with('/') {
            return Err(CgroupError::Malformed("a line has no numeric hierarchy or no absolute path"));
        }
        any = true;
        let elements: Vec<&str> = path.split('/').filter(|e| !e.is_empty()).collect();
        let container = elements.last().and_then(|l| container_id_in(l));
        let pod = elements.iter().find_map(|e| pod_uid_in(e));
        if let Some(c) = container {
            match &info.container_id {
                Some(prev) if *prev != c => return Err(CgroupError::Ambiguous("container")),
                _ => info.container_id = Some(c),
            }
        }
        if let Some(p) = pod {
            match &info.pod_uid {
                Some(prev) if *prev != p => return Err(CgroupError::Ambiguous("pod")),
                _ => info.pod_uid = Some(p),
            }
        }
    }
    if !any {
        return Err(CgroupError::Malformed("no cgroup lines"));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const ID2: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

    fn ok(s: &str) -> CgroupInfo {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn real_world_paths() {
        let both = CgroupInfo { container_id: Some(ID.into()), pod_uid: Some(UID.into()) };
        // cgroup v2, systemd driver, containerd.
        assert_eq!(
            ok(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{ID}.scope\n"
            )),
            both
        );
        // cgroup v2, besteffort, CRI-O.
        assert_eq!(
            ok(&format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice/crio-{ID}.scope\n"
            )),
            both
        );
        // cgroup v1, cgroupfs driver, several controllers agreeing.
        let v1 = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(ok(&v1), both);
        // Guaranteed QoS has no QoS slice.
        assert_eq!(ok(&format!("0::/kubepods/pod{UID}/{ID}")), both);
        // cgroup namespace: relative path.
        assert_eq!(ok(&format!("0::/../../pod{UID}/{ID}")), both);
        // Uppercase UID (never produced, but accepted) is normalised.
        assert_eq!(ok(&format!("0::/kubepods/pod{}/{ID}", UID.to_uppercase())).pod_uid.as_deref(), Some(UID));
        // Docker without Kubernetes: a container, no pod.
        assert_eq!(
            ok(&format!("0::/system.slice/docker-{ID}.scope")),
            CgroupInfo { container_id: Some(ID.into()), pod_uid: None }
        );
        assert_eq!(ok(&format!("12:pids:/docker/{ID}")).container_id.as_deref(), Some(ID));
        // A host process: nothing.
        assert_eq!(ok("0::/user.slice/user-1000.slice/session-3.scope\n"), CgroupInfo::default());
        assert_eq!(ok("0::/\n"), CgroupInfo::default());
        // Pod-level cgroup (e.g. the pause sandbox's parent): pod without container.
        assert_eq!(
            ok(&format!("0::/kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"))),
            CgroupInfo { container_id: None, pod_uid: Some(UID.into()) }
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse(&format!("1:cpu:/kubepods/pod{UID}/{ID}\n2:memory:/kubepods/pod{UID}/{ID2}\n")),
            Err(CgroupError::Ambiguous("container"))
        );
        let other = "3c48913c-b29f-11e7-9350-020968147796";
        assert_eq!(
            parse(&format!("1:cpu:/kubepods/pod{UID}/{ID}\n2:memory:/kubepods/pod{other}/{ID}\n")),
            Err(CgroupError::Ambiguous("pod"))
        );
        for bad in ["", "garbage", "x:y:/a", "0::relative", "0:"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&"0::/a\n".repeat(20_000)).is_err(), "size limit");
        // Near misses are not ids.
        assert_eq!(ok(&format!("0::/kubepods/pod{UID}/{}", &ID[..63])).container_id, None);
        assert_eq!(ok(&format!("0::/kubepods/pod{UID}/{}", ID.to_uppercase())).container_id, None);
        assert_eq!(ok(&format!("0::/kubepods/pod{UID}0/{ID}")).pod_uid, None, "UUID followed by more hex");
        // The container id must be the last element, not a parent.
        assert_eq!(ok(&format!("0::/{ID}/child")).container_id, None);
    }

    proptest::proptest! {
        /// Arbitrary input never panics, and whatever is returned is well-formed.
        #[test]
        fn arbitrary_input(s in "(([0-9]{1,2}|x):[a-z,=]{0,10}:/[a-zA-Z0-9_./-]{0,120}\n){0,6}") {
            if let Ok(info) = parse(&s) {
                if let Some(c) = info.container_id { proptest::prop_assert!(is_hex64(&c)); }
                if let Some(p) = info.pod_uid { proptest::prop_assert_eq!(p.len(), 36); }
            }
        }

        #[test]
        fn arbitrary_bytes(s in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse(&String::from_utf8_lossy(&s));
        }
    }
}
