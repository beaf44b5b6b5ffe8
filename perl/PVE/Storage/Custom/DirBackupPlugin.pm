package PVE::Storage::Custom::DirBackupPlugin;

# A dirbackup store as a Proxmox VE storage (type `dirbackup`, content
# `backup`) with the backup-provider feature.  Each storage method that
# reads or changes the store runs one request in a dirbackup process (see
# PVE::BackupProvider::Plugin::DirBackup and src/dirbackup/pveserve.py);
# the names and checks of volumes are dirbackup's.

use strict;
use warnings;

use PVE::BackupProvider::Plugin::DirBackup;

use base qw(PVE::Storage::Plugin);

my $provider_class = 'PVE::BackupProvider::Plugin::DirBackup';

sub api {
    # 11: PVE 8.4, the first with backup providers; newer hosts accept it.
    return 11;
}

sub type {
    return 'dirbackup';
}

sub plugindata {
    return {
        content => [{ backup => 1 }, { backup => 1 }],
        features => { 'backup-provider' => 1 },
        # dirbackup's options hold no secret: nothing to keep out of storage.cfg
        'sensitive-properties' => {},
    };
}

# Only the options no other storage type declares (PVE's schema is shared):
# path, prune-backups, max-protected-backups, nodes and disable are PVE's own.
sub properties {
    return {
        'vm-backup-mode' => {
            description => "full: always full VM backups; incremental: qcow2 images backed by"
                . " the previous backup, holding what the dirty bitmap says changed.",
            type => 'string',
            enum => ['full', 'incremental'],
            default => 'incremental',
        },
        'vm-backup-mechanism' => {
            description => "How VM disks are read: nbd exports or file handles.",
            type => 'string',
            enum => ['nbd', 'file-handle'],
            default => 'nbd',
        },
        'lxc-backup-mode' => {
            description => "Container archives: a GNU tar archive or a squashfs image.",
            type => 'string',
            enum => ['tar', 'squashfs'],
            default => 'tar',
        },
        compress => {
            description => "Compression of VM disk images: zstd, zstd:LEVEL or none.",
            type => 'string',
            pattern => qr/(?:zstd(?::-?\d+)?|none)/,
            default => 'zstd',
        },
        'lock-timeout' => {
            description => "Seconds a backup, removal or prune waits for another one of the"
                . " same guest.",
            type => 'number',
            minimum => 0,
            default => 60,
        },
        'io-timeout' => {
            description => "Seconds a backup waits for a source that makes no progress"
                . " (0: for ever).",
            type => 'number',
            minimum => 0,
            default => 60,
        },
    };
}

sub options {
    return {
        path => { fixed => 1 },
        content => { optional => 1 },
        'vm-backup-mode' => { optional => 1 },
        'vm-backup-mechanism' => { optional => 1 },
        'lxc-backup-mode' => { optional => 1 },
        compress => { optional => 1 },
        'prune-backups' => { optional => 1 },
        'max-protected-backups' => { optional => 1 },
        'lock-timeout' => { optional => 1 },
        'io-timeout' => { optional => 1 },
        nodes => { optional => 1 },
        disable => { optional => 1 },
    };
}

sub _call {
    my ($class, $storeid, $scfg, $log, $method, @args) = @_;
    return PVE::BackupProvider::Plugin::DirBackup::call_once(
        $storeid, $scfg, $log, "storage.$method", @args,
    );
}

# ---------------------------------------------------------------- provider

sub new_backup_provider {
    my ($class, $scfg, $storeid, $log_function) = @_;
    return $provider_class->new($class, $scfg, $storeid, $log_function);
}

# ---------------------------------------------------------------- volumes

# 'backup/<vmid>/<qemu|lxc>-<epoch>'; parsed here by the same rule as in
# dirbackup (store.BackupId), without starting a process: PVE calls this often.
sub parse_volname {
    my ($class, $volname) = @_;
    if ($volname =~ m!^backup/([1-9][0-9]{0,8})/((?:qemu|lxc)-(?:0|[1-9][0-9]{0,10}))$!) {
        return ('backup', "$1/$2", $1 + 0, undef, undef, 0, 'directory');
    }
    die "unable to parse dirbackup volume name '$volname'\n";
}

sub path {
    my ($class, $scfg, $volname, $storeid, $snapname) = @_;
    die "volume snapshots are not possible on a dirbackup store\n" if $snapname;
    my (undef, $name, $vmid) = $class->parse_volname($volname);
    return ("$scfg->{path}/$name", $vmid, 'backup');
}

sub filesystem_path {
    my ($class, $scfg, $volname, $snapname) = @_;
    my ($path, $vmid, $vtype) = $class->path($scfg, $volname, undef, $snapname);
    return wantarray ? ($path, $vmid, $vtype) : $path;
}

sub status {
    my ($class, $storeid, $scfg, $cache) = @_;
    my $res = $class->_call($storeid, $scfg, undef, 'status');
    return ($res->[0], $res->[1], $res->[2], $res->[3] ? 1 : 0);
}

sub activate_storage {
    my ($class, $storeid, $scfg, $cache) = @_;
    die "unable to activate storage '$storeid' - directory '$scfg->{path}' does not exist\n"
        if !-d $scfg->{path};
    return 1;
}

sub deactivate_storage {
    return 1;
}

sub activate_volume {
    my ($class, $storeid, $scfg, $volname, $snapname, $cache) = @_;
    $class->path($scfg, $volname, $storeid, $snapname);
    return 1;
}

sub deactivate_volume {
    return 1;
}

sub list_volumes {
    my ($class, $storeid, $scfg, $vmid, $content_types) = @_;
    return [] if !grep { $_ eq 'backup' } @{ $content_types // ['backup'] };
    my $res = $class->_call(
        $storeid, $scfg, undef, 'list_volumes', defined($vmid) ? $vmid + 0 : undef, ['backup'],
    );
    for my $vol (@$res) {
        $vol->{protected} = $vol->{protected} ? 1 : 0;
        delete $vol->{parent} if !defined($vol->{parent});
    }
    return $res;
}

sub list_images {
    return [];
}

sub volume_size_info {
    my ($class, $scfg, $storeid, $volname, $timeout) = @_;
    my $res = $class->_call($storeid, $scfg, undef, 'volume_size_info', "$volname");
    return wantarray ? @$res : $res->[0];
}

sub get_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute) = @_;
    my $res = $class->_call($storeid, $scfg, undef, 'get_volume_attribute', "$volname", "$attribute");
    return $res;
}

sub update_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute, $value) = @_;
    die "attribute '$attribute' is not supported for storage type 'dirbackup'\n"
        if $attribute ne 'notes' && $attribute ne 'protected';
    $value = $attribute eq 'protected' ? ($value ? 1 : 0) : PVE::BackupProvider::Plugin::DirBackup::text_in($value);
    $class->_call($storeid, $scfg, undef, 'update_volume_attribute', "$volname", $attribute, $value);
    return;
}

sub free_image {
    my ($class, $storeid, $scfg, $volname, $isBase, $format) = @_;
    $class->_call($storeid, $scfg, undef, 'free_image', "$volname");
    return undef;
}

sub prune_backups {
    my ($class, $scfg, $storeid, $keep, $vmid, $type, $dryrun, $logfunc) = @_;
    my $log = $logfunc ? sub { $logfunc->($_[0], $_[1]) } : undef;
    return $class->_call(
        $storeid, $scfg, $log, 'prune_backups', $keep // $scfg->{'prune-backups'},
        defined($vmid) ? $vmid + 0 : undef, $type, $dryrun ? JSON::PP::true : JSON::PP::false,
    );
}

# ---------------------------------------------------------------- not for a backup store

for my $method (qw(
    alloc_image clone_image create_base volume_resize volume_snapshot
    volume_snapshot_rollback volume_snapshot_delete
)) {
    no strict 'refs';
    *{$method} = sub { die "$method is not possible on a dirbackup store\n" };
}

sub volume_has_feature {
    return undef;
}

1;
