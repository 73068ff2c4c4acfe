//! The lock nodes: their names and how one is created.
//!
//! Every lock node is an ephemeral sequential node named
//! `_c_<uuid>-lock-<sequence>` in the key's lock directory: the layout of
//! Apache Curator's `InterProcessMutex` with "protected" names, so that
//! distlock and Curator clients queue in one lock directory and exclude
//! each other. The naming must not change.
//!
//! - The protected prefix `_c_<uuid>-` lets a client whose create was cut
//!   off by a connection loss find its own node by listing, instead of
//!   creating a second one.
//! - The shared `lock-` tag and the server's sequence give the queue
//!   order; children without it (other recipes' nodes) are not lock nodes.
//! - Each key's directory is a *container* node, which the server removes
//!   once it is empty again, so directories do not pile up; it is made
//!   (with persistent parents) on first use, or when it vanished under us.

use zookeeper_client as zk;

use distlock_core::Result;

use crate::session::{is_connection_loss, op_error, retry_on_loss, Session};

/// Every lock node's name is `_c_<uuid>-lock-<sequence>`, the shape of
/// Apache Curator's "protected" lock nodes: the random part lets a client
/// whose create was cut off by a connection loss find its own node, and
/// the shared `lock-` tag plus the server's sequence give the queue order.
const LOCK_TAG: &str = "lock-";

/// A node this process created in a lock directory.
pub(crate) struct Created {
    /// Node name within the directory.
    pub(crate) name: String,
    /// Its protected prefix, `_c_<uuid>-`.
    pub(crate) protected: String,
    /// The server's sequence number, the queue position.
    pub(crate) sequence: i64,
    /// The zxid that created the node: the fencing token.
    pub(crate) czxid: i64,
}

/// The protected part of a new node's name: `_c_<uuid v4>-`.
pub(crate) fn protected_prefix() -> String {
    let mut bytes = [0u8; 16];
    for byte in bytes.iter_mut() {
        *byte = fastrand::u8(..);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "_c_{}-{}-{}-{}-{}-",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The queue sequence of a lock node's name, `None` for other children.
pub(crate) fn sequence_of(name: &str) -> Option<i64> {
    let (_, digits) = name.rsplit_once(LOCK_TAG)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn ephemeral_sequential() -> zk::CreateOptions<'static> {
    zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all())
}

/// Creates our node in `dir` (making the directory, a container node, and
/// the prefix above it when missing). After a connection loss it looks for
/// the node by its protected prefix instead of creating a second one.
pub(crate) async fn create_node(
    session: &Session,
    dir: &str,
    protected: &str,
    key: &str,
) -> Result<Created> {
    let node_prefix = format!("{dir}/{protected}{LOCK_TAG}");
    let mut made_dir = 0;
    loop {
        match session
            .client
            .create(&node_prefix, &[], &ephemeral_sequential())
            .await
        {
            Ok((stat, sequence)) => {
                return Ok(Created {
                    name: format!("{protected}{LOCK_TAG}{sequence}"),
                    protected: protected.to_owned(),
                    sequence: sequence.into_i64(),
                    czxid: stat.czxid,
                })
            }
            // The directory is missing (first use, or the server removed
            // the empty container): make it, then create again. Bounded,
            // in case the container keeps vanishing under us.
            Err(zk::Error::NoNode) if made_dir < 5 => {
                make_dir(session, dir, key).await?;
                made_dir += 1;
            }
            Err(err) if is_connection_loss(&err) => {
                if let Some(found) = find_own(session, dir, protected, key).await? {
                    return Ok(found);
                }
            }
            Err(err) => return Err(op_error(session, "acquire", key, err)),
        }
    }
}

/// Makes the lock directory `dir` as a container node (the server deletes
/// it once it has been used and is empty again), and its parents as
/// persistent nodes.
async fn make_dir(session: &Session, dir: &str, key: &str) -> Result<()> {
    let container = zk::CreateMode::Container.with_acls(zk::Acls::anyone_all());
    for _ in 0..2 {
        match retry_on_loss(|| session.client.create(dir, &[], &container)).await {
            Ok(_) | Err(zk::Error::NodeExists) => return Ok(()),
            Err(zk::Error::NoNode) => {
                let (parent, _) = dir.rsplit_once('/').unwrap_or(("", dir));
                let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
                retry_on_loss(|| session.client.mkdir(parent, &persistent))
                    .await
                    .map_err(|err| op_error(session, "acquire", key, err))?;
            }
            Err(err) => return Err(op_error(session, "acquire", key, err)),
        }
    }
    Ok(())
}

/// Finds the node our session created with `protected`, if the create
/// went through before the connection was lost.
pub(crate) async fn find_own(
    session: &Session,
    dir: &str,
    protected: &str,
    key: &str,
) -> Result<Option<Created>> {
    let children = match retry_on_loss(|| session.client.list_children(dir)).await {
        Ok(children) => children,
        Err(zk::Error::NoNode) => return Ok(None),
        Err(err) => return Err(op_error(session, "acquire", key, err)),
    };
    let Some(name) = children
        .into_iter()
        .find(|name| name.starts_with(protected))
    else {
        return Ok(None);
    };
    let path = format!("{dir}/{name}");
    match retry_on_loss(|| session.client.check_stat(&path)).await {
        Ok(Some(stat)) if stat.ephemeral_owner == session.id => Ok(Some(Created {
            sequence: sequence_of(&name).unwrap_or(i64::MAX),
            protected: protected.to_owned(),
            name,
            czxid: stat.czxid,
        })),
        Ok(_) => Ok(None),
        Err(err) => Err(op_error(session, "acquire", key, err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_parse_like_curators() {
        let protected = protected_prefix();
        assert!(protected.starts_with("_c_") && protected.ends_with('-'));
        assert_eq!(protected.len(), 3 + 36 + 1);
        assert_ne!(protected, protected_prefix());
        assert_eq!(
            sequence_of(&format!("{protected}lock-0000000042")),
            Some(42)
        );
        assert_eq!(sequence_of("_c_x-latch-0000000001"), None);
        assert_eq!(sequence_of("lock-"), None);
        assert_eq!(sequence_of("lock-12a"), None);
    }
}
