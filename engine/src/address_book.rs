//! Where each member of the cell listens and in which zone. Loaded from the `meta` column family
//! (and the initial members' flags), changed when a membership change applies, carried by
//! snapshots, and read by the transport to dial peers and by the receiving side to refuse strangers.

use crate::db::cf;
use crate::error::StorageError;
use crate::keys::{self, CF_META};
use crate::state::{Member, Members};
use nid_proto::codec;
use std::collections::BTreeMap;
use std::sync::RwLock;

/// The cell's members by node id.
#[derive(Debug, Default)]
pub struct AddressBook {
    members: RwLock<BTreeMap<u64, Member>>,
}

impl AddressBook {
    /// A book holding `members`.
    pub fn new(members: impl IntoIterator<Item = Member>) -> AddressBook {
        AddressBook { members: RwLock::new(members.into_iter().map(|m| (m.id, m)).collect()) }
    }

    /// Loads the persisted book and overlays `configured` (the flags win for the members they list).
    pub fn load(
        db: &rocksdb::DB,
        configured: impl IntoIterator<Item = Member>,
    ) -> Result<AddressBook, StorageError> {
        let book = AddressBook::default();
        book.reload(db)?;
        if let Ok(mut members) = book.members.write() {
            for m in configured {
                members.insert(m.id, m);
            }
        }
        Ok(book)
    }

    /// Replaces the book with the persisted one (after a snapshot install).
    pub fn reload(&self, db: &rocksdb::DB) -> Result<(), StorageError> {
        let stored = match db.get_cf(cf(db, CF_META)?, keys::ADDRESS_BOOK)? {
            Some(bytes) => codec::decode::<Members>(&bytes)
                .map_err(|source| StorageError::Corrupt { what: "address book", source })?,
            None => return Ok(()),
        };
        if let Ok(mut members) = self.members.write() {
            *members = stored.members.into_iter().map(|m| (m.id, m)).collect();
        }
        Ok(())
    }

    /// The address of `id`.
    pub fn address(&self, id: u64) -> Option<String> {
        self.members.read().ok()?.get(&id).map(|m| m.address.clone())
    }

    /// True when `id` is a known member.
    pub fn contains(&self, id: u64) -> bool {
        self.members.read().is_ok_and(|m| m.contains_key(&id))
    }

    /// Every member, by id.
    pub fn members(&self) -> Vec<Member> {
        self.members.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// Records members added by a membership change and forgets removed ones, staging the new book
    /// into `wb` (the apply batch of the change).
    pub fn update(
        &self,
        db: &rocksdb::DB,
        added: &[Member],
        removed: &[u64],
        wb: &mut rocksdb::WriteBatch,
    ) -> Result<(), StorageError> {
        if let Ok(mut members) = self.members.write() {
            for m in added {
                members.insert(m.id, m.clone());
            }
            for id in removed {
                members.remove(id);
            }
        }
        wb.put_cf(cf(db, CF_META)?, keys::ADDRESS_BOOK, codec::encode(&Members { members: self.members() }));
        Ok(())
    }
}
