//! The numeric codes probes carry, with the label each one becomes in a metric.
//!
//! The numbers are part of the probe contract: tracers decode them, so a value never changes
//! meaning and new values are only appended.

macro_rules! codes {
    ($(#[$doc:meta])* $enum:ident { $($variant:ident = $value:literal => $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $enum {
            $($variant = $value,)+
        }

        impl $enum {
            pub const ALL: &[$enum] = &[$($enum::$variant,)+];

            /// The metric label value for this code.
            pub fn label(self) -> &'static str {
                match self {
                    $($enum::$variant => $label,)+
                }
            }

            pub fn from_u8(value: u8) -> Option<Self> {
                match value {
                    $($value => Some($enum::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// Message types on the wire; `message_type` label of the message counters.
    Command {
        Request = 1 => "request",
        Reply = 2 => "reply",
        Prepare = 3 => "prepare",
        PrepareOk = 4 => "prepare_ok",
        Commit = 5 => "commit",
        StartViewChange = 6 => "start_view_change",
        DoViewChange = 7 => "do_view_change",
        StartView = 8 => "start_view",
        Recovery = 9 => "recovery",
        RecoveryResponse = 10 => "recovery_response",
        RequestPrepare = 11 => "request_prepare",
        RequestStartView = 12 => "request_start_view",
        // The first message on a connection a replica opens: names the replica it speaks for.
        Hello = 13 => "hello",
        RequestCheckpoint = 14 => "request_checkpoint",
        Checkpoint = 15 => "checkpoint",
    }
}

codes! {
    /// `vsr_replica_status`: the seed's numbering.
    ReplicaStatus {
        Normal = 0 => "normal",
        ViewChange = 1 => "view_change",
        Recovering = 2 => "recovering",
        StateTransfer = 3 => "state_transfer",
    }
}

codes! {
    /// Why a view change started; `reason` label of `vsr_view_changes_total`.
    ViewChangeReason {
        PrimaryTimeout = 0 => "primary_timeout",
        PrimaryDisconnected = 1 => "primary_disconnected",
        OperatorRequest = 2 => "operator_request",
        HigherView = 3 => "higher_view",
        ViewChangeTimeout = 4 => "view_change_timeout",
    }
}

codes! {
    /// Why a message was rejected; `reason` label of `vsr_byzantine_rejections_total`.
    RejectReason {
        HeaderChecksum = 0 => "header_checksum",
        BodyChecksum = 1 => "body_checksum",
        WrongCluster = 2 => "wrong_cluster",
        BadVersion = 3 => "bad_version",
        UnknownCommand = 4 => "unknown_command",
        BadSize = 5 => "bad_size",
        UnknownReplica = 6 => "unknown_replica",
        InvalidFields = 7 => "invalid_fields",
        EntryChecksum = 8 => "entry_checksum",
        // A replica's message on a client connection, or one claiming another replica than
        // the one its connection speaks for, or a connection claiming a replica it cannot be.
        PeerIdentity = 9 => "peer_identity",
        // An op so far above the replica's commit that holding it would grow its journal
        // index beyond `--op-ahead-max`.
        OpOutOfWindow = 10 => "op_out_of_window",
    }
}

codes! {
    /// Where a checksum failed; `component` label of `vsr_checksum_failures_total`.
    Component {
        Log = 0 => "log",
        Superblock = 1 => "superblock",
        Checkpoint = 2 => "checkpoint",
    }
}

codes! {
    /// Outcome of a repair; `status` label of `vsr_repairs_total`.
    RepairStatus {
        Success = 0 => "success",
        Failure = 1 => "failure",
    }
}

/// The `peer` argument of message probes when the other end is a client, not a replica.
pub const PEER_CLIENT: u8 = u8::MAX;
