package PVE::Storage::Plugin;

# A stand-in for Proxmox VE's storage plugin base class, written from the
# documented plugin API: the defaults a custom plugin inherits, and the
# properties PVE's own plugins already declare (a custom plugin must list
# those in options() only; declaring one again makes PVE's schema refuse the
# plugin).

use strict;
use warnings;

our %CORE_PROPERTIES = map { $_ => 1 } qw(
    type storage nodes content disable shared path format
    prune-backups max-protected-backups maxfiles mkdir create-base-path
    create-subdirs content-dirs is_mountpoint preallocation snapshot-as-volume-chain
);

sub api { return 11 }

sub plugindata { return {} }

sub properties { return {} }

sub options { return {} }

sub check_connection { return 1 }

sub activate_storage { return 1 }

sub deactivate_storage { return 1 }

sub on_add_hook { return undef }

sub on_update_hook { return undef }

sub on_delete_hook { return undef }

1;
