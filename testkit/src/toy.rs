//! A toy key-value state machine for the engine's tests: puts and deletes under a bucket prefix,
//! and a command that halts the replica (as a missing key or a storage failure would).

use nid_engine::{ApplyContext, KvRead as _, StateMachine, StorageError, View};

/// A toy command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ToyCommand {
    /// The bucket the key lives in.
    #[prost(uint32, tag = "1")]
    pub bucket: u32,
    /// The key (after the bucket prefix).
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// The value to put; None deletes.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub value: Option<Vec<u8>>,
    /// Halt the replica that applies this (tests of a replica that cannot go on).
    #[prost(bool, tag = "4")]
    pub halt: bool,
}

impl ToyCommand {
    /// Puts `value` under `key` in `bucket`.
    pub fn put(bucket: u32, key: &str, value: &str) -> ToyCommand {
        ToyCommand {
            bucket,
            key: key.as_bytes().to_vec(),
            value: Some(value.as_bytes().to_vec()),
            halt: false,
        }
    }
}

/// The key a toy command writes.
pub fn toy_key(bucket: u32, key: &[u8]) -> Vec<u8> {
    let mut k = (bucket as u16).to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

/// The toy state machine; it counts how often it was restored.
#[derive(Default)]
pub struct Toy {
    /// Restores so far (start, snapshot installs).
    pub restores: u64,
}

impl StateMachine for Toy {
    type Command = ToyCommand;
    type Output = Option<Vec<u8>>;

    fn encode(command: &ToyCommand) -> Vec<u8> {
        nid_proto::codec::encode(command)
    }

    fn decode(bytes: &[u8]) -> Result<ToyCommand, String> {
        nid_proto::codec::decode(bytes).map_err(|e| e.to_string())
    }

    fn bucket(command: &ToyCommand) -> Option<u32> {
        Some(command.bucket)
    }

    fn apply(
        &mut self,
        command: ToyCommand,
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        if command.halt {
            return Err(StorageError::Halted("the toy was told to halt".into()));
        }
        let key = toy_key(command.bucket, &command.key);
        let previous = ctx.get(&key)?;
        match command.value {
            Some(v) => ctx.put(&key, v)?,
            None => ctx.delete(&key)?,
        }
        Ok(previous)
    }

    fn restore(&mut self, _view: &View<'_>) -> Result<(), StorageError> {
        self.restores += 1;
        Ok(())
    }
}
