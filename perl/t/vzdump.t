#!/usr/bin/perl

# The two plugins driven as Proxmox VE's vzdump and restore drive them,
# against real qemu-nbd exports of qcow2 guests with persistent dirty
# bitmaps: full, incremental over nbd, incremental over a file handle
# (nbdfuse + next-dirty-region), a failure in the middle of a backup, the
# provider process dying before job_cleanup; every backup point restored
# through `qemu-img-path` with `qemu-img convert` and judged by
# `qemu-img compare`; the storage methods on the resulting store.
#
# The host side here plays QEMU's part as PVE sets it up: a bitmap per disk
# (created for `new`, kept for `use`, dropped for `none`), frozen at the
# snapshot point into a disabled copy that the export serves, merged back
# when the backup fails.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib", "$FindBin::Bin/..";

use File::Temp ();
use JSON::PP;
use POSIX ();
use Test::More;

use PVE::Storage::Custom::DirBackupPlugin;
use PVE::JSONSchema;

my $root = "$FindBin::Bin/../..";
$ENV{DIRBACKUP_COMMAND} //= "$root/.venv/bin/dirbackup";

my $plugin = 'PVE::Storage::Custom::DirBackupPlugin';
my $storeid = 'dirbackup-test';
my $base = -d '/dev/shm' ? '/dev/shm' : File::Temp::tempdir();
my $dir = File::Temp::tempdir("$base/dirbackup-pve-XXXXXX", CLEANUP => 1);
my $store = "$dir/store";
mkdir($store) or die "mkdir $store: $!\n";

my $MiB = 1024 * 1024;
my %disks = ('drive-scsi0' => 64 * $MiB, 'drive-virtio1' => 8 * $MiB);
my $BITMAP = "pve-$storeid";    # the host's bitmap name per storage, as PVE's
my @cleanups;
my $vmid = 4242;

sub run {
    my (@cmd) = @_;
    open(my $out, '-|', @cmd) or die "cannot run $cmd[0]: $!\n";
    local $/;
    my $text = <$out> // '';
    close($out);
    die "@cmd: exit status " . ($? >> 8) . "\n" if $?;
    return $text;
}

sub image { return "$dir/$_[0].qcow2" }

sub qemu_io {
    my ($device, @commands) = @_;
    run('qemu-io', '-f', 'qcow2', map({ ('-c', $_) } @commands), image($device));
}

sub bitmaps_of {
    my ($device) = @_;
    my $info = decode_json(run('qemu-img', 'info', '--output=json', '-U', image($device)));
    my $list = $info->{'format-specific'}->{data}->{bitmaps} // [];
    return { map { $_->{name} => 1 } @$list };
}

sub bitmap {
    my ($device, @args) = @_;
    run('qemu-img', 'bitmap', @args[0 .. $#args - 1], image($device), $args[-1]);
}

# A process in the foreground of its own, ready once its pid file exists.
sub start_tool {
    my ($pidfile, @cmd) = @_;
    unlink($pidfile);
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        open(STDOUT, '>', '/dev/null');
        exec { $cmd[0] } @cmd or POSIX::_exit(127);
    }
    for (1 .. 600) {
        return $pid if -e $pidfile;
        die "@cmd exited early\n" if waitpid($pid, POSIX::WNOHANG()) == $pid;
        select(undef, undef, undef, 0.02);
    }
    kill('KILL', $pid);
    die "@cmd did not start\n";
}

sub stop_tool {
    my ($pid) = @_;
    kill('TERM', $pid);
    waitpid($pid, 0);
}

# QEMU's side of one backup: per device the bitmap mode, the exports.
sub snapshot_access {
    my ($tag, $mechanism, $incremental) = @_;
    my (%volumes, @stop);
    for my $device (sort keys %disks) {
        my $mode = $incremental->{$device} // 'none';
        die "invalid incremental mode '$mode' returned by backup provider plugin\n"
            if $mode ne 'new' && $mode ne 'use' && $mode ne 'none';
        my $present = bitmaps_of($device);
        bitmap($device, '--remove', $BITMAP) if $present->{$BITMAP} && $mode ne 'use';
        my $bitmap_mode = $mode eq 'none' ? 'none' : 'new';
        if ($mode eq 'use' && $present->{$BITMAP}) {
            $bitmap_mode = 'reuse';
        } elsif ($mode ne 'none') {
            bitmap($device, '--add', $BITMAP);
        }
        my $frozen = "$BITMAP-snapshot";
        if ($bitmap_mode ne 'none') {    # the snapshot point: freeze, start anew
            bitmap($device, '--add', '--disable', $frozen);
            bitmap($device, '--merge', $BITMAP, $frozen);
            bitmap($device, '--clear', $BITMAP);
        }
        my $sock = "$dir/$tag-$device.sock";
        my $pid = start_tool(
            "$sock.pid", 'qemu-nbd', '--read-only', '--persistent', '--shared=8',
            '--format=qcow2', "--export-name=$device", "--socket=$sock", "--pid-file=$sock.pid",
            ($bitmap_mode ne 'none' ? ("--bitmap=$frozen") : ()), image($device),
        );
        push @stop, sub { stop_tool($pid) };
        my $vol = { size => $disks{$device}, 'bitmap-mode' => $bitmap_mode };
        if ($mechanism eq 'nbd') {
            $vol->{'nbd-path'} = $sock;
            $vol->{'bitmap-name'} = $frozen if $bitmap_mode ne 'none';
        } else {
            my $uri = "nbd+unix:///$device?socket=$sock";
            my $mnt = "$dir/$tag-$device.fuse";
            mkdir($mnt);
            my $fuse = start_tool("$mnt.pid", 'nbdfuse', '-r', '-P', "$mnt.pid", "$mnt/disk", $uri);
            open(my $fh, '<', "$mnt/disk") or die "open $mnt/disk: $!\n";
            unshift @stop, sub {
                close($fh);
                system('fusermount3', '-u', $mnt) == 0 or kill('TERM', $fuse);
                waitpid($fuse, 0);
            };
            my @regions = ([0, $disks{$device}]);
            if ($bitmap_mode eq 'reuse') {
                @regions = ();
                for my $line (split /\n/, run('nbdinfo', "--map=qemu:dirty-bitmap:$frozen", $uri)) {
                    my ($offset, $length, $type) = $line =~ /^\s*(\d+)\s+(\d+)\s+(\d+)/ or next;
                    push @regions, [$offset, $length] if $type & 1;
                }
            }
            $vol->{'file-handle'} = $fh;
            $vol->{'next-dirty-region'} = sub { return @{ shift(@regions) // [] } };
        }
        $volumes{$device} = $vol;
    }
    return (\%volumes, \@stop);
}

# After backup_vm: the frozen copies go; on failure they are merged back.
sub teardown {
    my ($stop, $success) = @_;
    $_->() for @$stop;
    for my $device (sort keys %disks) {
        my $frozen = "$BITMAP-snapshot";
        next if !bitmaps_of($device)->{$frozen};
        bitmap($device, '--merge', $frozen, $BITMAP)
            if !$success;
        bitmap($device, '--remove', $frozen);
    }
}

my @log;
my $logf = sub { push @log, [@_] };

# One guest backup in vzdump's order; returns (volid or undef, error).
sub vzdump {
    my ($tag, $scfg, $start, %opt) = @_;
    my $p = $plugin->new_backup_provider($scfg, $storeid, $logf);
    @log = ();
    $p->job_init($start);
    my ($volid, $err, $stop);
    my $init = $p->backup_init($vmid, 'qemu', $start);
    eval {
        my $mechanism = $p->backup_get_mechanism($vmid, 'qemu');
        my $query = { map { $_ => { size => $disks{$_} } } keys %disks };
        my $inc = $p->backup_vm_query_incremental($vmid, $query) // {};
        $opt{seen}->(%$inc) if $opt{seen};
        (my $volumes, $stop) = snapshot_access($tag, $mechanism, $inc);
        $opt{tamper}->($volumes) if $opt{tamper};
        $p->backup_vm($vmid, "name: guest\nscsi0: local:$vmid/disk.qcow2\n", $volumes,
            { 'bandwidth-limit' => 0, 'firewall-config' => "[OPTIONS]\nenable: 1\n" });
    };
    $err = $@;
    teardown($stop // [], !$err);
    my $res = $p->backup_cleanup($vmid, 'qemu', $err ? 0 : 1, $err ? { error => $err } : {});
    my $logfile = "$dir/$tag.log";
    open(my $fh, '>', $logfile) or die;
    print $fh "task log of $tag\n";
    close($fh);
    $p->backup_handle_log_file($vmid, $logfile);
    if ($opt{kill_server}) {
        my $pid = $p->{server}->{pid};
        kill('KILL', $pid);
        waitpid($pid, 0);    # gone for sure: the request's write fails (EPIPE), never SIGPIPE
        ok(!eval { $p->job_cleanup(); 1 }, "$tag: job_cleanup fails when the process died");
        ok(eval { $p->job_cleanup(); 1 }, "$tag: a second job_cleanup succeeds") or diag($@);
        ok(!kill(0, $pid), "$tag: no provider process left");
    } else {
        my $pid = $p->{server}->{pid};
        $p->job_cleanup();
        ok(!kill(0, $pid), "$tag: job_cleanup stopped the provider process");
    }
    $volid = "$storeid:backup/$init->{'archive-name'}" if !$err;
    return ($volid, $err, $res);
}

sub raw_copy {
    my ($tag) = @_;
    for my $device (sort keys %disks) {
        run('qemu-img', 'convert', '-U', '-f', 'qcow2', '-O', 'raw', image($device),
            "$dir/$tag-$device.raw");
    }
}

# PVE's restore of a VM archive through the qemu-img mechanism.
sub restore_and_compare {
    my ($tag, $volid, $scfg) = @_;
    my (undef, $volname) = split(/:/, $volid, 2);
    my $p = $plugin->new_backup_provider($scfg, $storeid, $logf);
    my ($mechanism, $vmtype) = $p->restore_get_mechanism($volname);
    is("$mechanism/$vmtype", 'qemu-img/qemu', "$tag: restore mechanism");
    like($p->archive_get_guest_config($volname), qr/^name: guest$/m, "$tag: guest config");
    is($p->archive_get_firewall_config($volname), "[OPTIONS]\nenable: 1\n", "$tag: firewall");
    my $devices = $p->restore_vm_init($volname);
    is_deeply([sort keys %$devices], [sort keys %disks], "$tag: devices");
    for my $device (sort keys %$devices) {
        my $size = $devices->{$device}->{size};
        is($size, $disks{$device}, "$tag $device: size");
        my $path = $p->restore_vm_volume_init($volname, $device, {})->{'qemu-img-path'};
        ok(defined($path) && -e $path, "$tag $device: qemu-img-path exists");
        my $info = decode_json(run('qemu-img', 'info', '-f', 'raw', '--output=json', $path));
        ok(!defined($info->{'backing-filename'}), "$tag $device: no backing file");
        is($info->{'virtual-size'}, $size, "$tag $device: raw size");
        my $target = "$dir/$tag-$device.restored";
        run('qemu-img', 'create', '-q', '-f', 'raw', $target, $size);
        run('qemu-img', 'convert', '-n', '-f', 'raw', '-O', 'raw', $path, $target);
        $p->restore_vm_volume_cleanup($volname, $device, {});
        my $same = eval { run('qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'raw', $target,
            "$dir/$tag-$device.raw"); 1 };
        ok($same, "$tag $device: restored image equals the guest at backup time");
        unlink($target);
    }
    my $pid = $p->{server}->{pid};
    $p->restore_vm_cleanup($volname);
    ok(!$p->{server} && !kill(0, $pid), "$tag: provider process stopped after restore");
}

# ---------------------------------------------------------------- the plugins' declarations

is($plugin->type, 'dirbackup', 'storage type');
cmp_ok($plugin->api, '>=', 11, 'storage API 11 or later');
my $pd = $plugin->plugindata;
is($pd->{features}->{'backup-provider'}, 1, 'backup-provider feature');
is_deeply($pd->{content}, [{ backup => 1 }, { backup => 1 }], 'content: backup');
is(ref($pd->{'sensitive-properties'}), 'HASH', 'sensitive properties declared');
my $props = $plugin->properties;
my $opts = $plugin->options;
for my $name (sort keys %$props) {
    ok(!$PVE::Storage::Plugin::CORE_PROPERTIES{$name}, "$name is not one of PVE's own properties");
}
for my $name (sort keys %$opts) {
    ok($props->{$name} || $PVE::Storage::Plugin::CORE_PROPERTIES{$name}, "option $name is declared");
}
ok($opts->{$_}, "option $_") for qw(path compress prune-backups max-protected-backups);
ok(PVE::JSONSchema::check_value('compress', $props->{compress}, $_), "compress=$_ accepted")
    for qw(zstd zstd:3 none);
ok(!eval { PVE::JSONSchema::check_value('compress', $props->{compress}, 'gzip') }, 'compress=gzip refused');
ok(!eval { PVE::JSONSchema::check_value('vm-backup-mechanism', $props->{'vm-backup-mechanism'}, 'tcp') },
    'unknown mechanism refused');
my $provider_class = 'PVE::BackupProvider::Plugin::DirBackup';
for my $method (@PVE::BackupProvider::Plugin::Base::METHODS) {
    isnt($provider_class->can($method), PVE::BackupProvider::Plugin::Base->can($method),
        "provider implements $method");
}
my @parsed = $plugin->parse_volname('backup/100/qemu-1700000000');
is_deeply([@parsed[0 .. 2]], ['backup', '100/qemu-1700000000', 100], 'parse_volname');
ok(!eval { $plugin->parse_volname("backup/100/../qemu-1") }, 'parse_volname refuses ..');

{
    local $ENV{DIRBACKUP_COMMAND} = "$dir/no-such-dirbackup";
    my $p = $plugin->new_backup_provider({ path => $store }, $storeid, $logf);
    ok(!eval { $p->job_init(1); 1 }, 'a missing program fails job_init');
    like($@, qr/^dirbackup: the provider process ended during job_init \(\Q$dir\E\/no-such-dirbackup could not be run: is dirbackup installed\?/,
        'and says which program could not be run');
    ok(eval { $p->job_cleanup(); 1 }, 'job_cleanup after it');
}

# ---------------------------------------------------------------- a guest and its backups

for my $device (sort keys %disks) {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', image($device), $disks{$device});
}
qemu_io('drive-scsi0', 'write -P 0x11 0 8M', 'write -P 0x22 20M 4M', 'write -P 0x33 63M 1M');
qemu_io('drive-virtio1', 'write -P 0x44 0 2M');

my $nbd = { type => 'dirbackup', path => $store, 'vm-backup-mechanism' => 'nbd' };
my $fh_cfg = { %$nbd, 'vm-backup-mechanism' => 'file-handle' };
my $t0 = 1790000000;

# 1: full, nbd
my %seen;
raw_copy('b1');
my ($v1, $e1, $r1) = vzdump('b1', $nbd, $t0, seen => sub { %seen = @_ });
ok($v1, 'b1: full backup over nbd') or diag($e1);
is_deeply(\%seen, { 'drive-scsi0' => 'new', 'drive-virtio1' => 'new' }, 'b1: new bitmaps');
cmp_ok($r1->{stats}->{'archive-size'}, '>', 0, 'b1: archive size');
ok(grep({ $_->[1] =~ /job started/ } @log), 'b1: log lines reach the log function');

# 2: incremental, nbd (changes, a zeroed range, a discard)
qemu_io('drive-scsi0', 'write -P 0x55 1M 64k', 'write -z 20M 1M', 'write -P 0x66 40M 2M');
qemu_io('drive-virtio1', 'discard 0 1M');
raw_copy('b2');
my ($v2, $e2) = vzdump('b2', $nbd, $t0 + 60, seen => sub { %seen = @_ });
ok($v2, 'b2: incremental backup over nbd') or diag($e2);
is_deeply(\%seen, { 'drive-scsi0' => 'use', 'drive-virtio1' => 'use' }, 'b2: bitmaps used');
ok(grep({ $_->[1] =~ /incremental backup/ } @log), 'b2: the provider took an incremental');

# 3: incremental, file-handle
qemu_io('drive-scsi0', 'write -P 0x77 8M 128k', 'write -P 0x88 62M 512k');
raw_copy('b3');
my ($v3, $e3) = vzdump('b3', $fh_cfg, $t0 + 120);
ok($v3, 'b3: incremental backup over a file handle') or diag($e3);
ok(grep({ $_->[1] =~ /incremental backup/ } @log), 'b3: incremental');

# 4: a failure in the middle (the second disk's bitmap is not exported)
qemu_io('drive-scsi0', 'write -P 0x99 30M 1M');
qemu_io('drive-virtio1', 'write -P 0xaa 4M 1M');
my $before = $plugin->list_volumes($storeid, $nbd, $vmid, ['backup']);
my ($v4, $e4) = vzdump('b4', $nbd, $t0 + 180,
    tamper => sub { $_[0]->{'drive-virtio1'}->{'bitmap-name'} = 'no-such-bitmap' });
ok(!$v4 && $e4, 'b4: the backup failed') and note("b4: $e4");
ok(grep({ $_->[0] eq 'err' && $_->[1] =~ /failed/ } @log), 'b4: the failure is in the task log');
my $after = $plugin->list_volumes($storeid, $nbd, $vmid, ['backup']);
is(scalar(@$after), scalar(@$before), 'b4: nothing published');

# 5: the next incremental still holds the changes of the failed one; the
# provider process is killed before job_cleanup
raw_copy('b5');
my ($v5, $e5) = vzdump('b5', $nbd, $t0 + 240, kill_server => 1);
ok($v5, 'b5: incremental after a failure') or diag($e5);

# backup_handle_log_file when backup_init never ran
{
    my $p = $plugin->new_backup_provider($nbd, $storeid, $logf);
    @log = ();
    ok(eval { $p->backup_handle_log_file(99, "$dir/b1.log"); 1 }, 'log file without a job');
    $p->job_init($t0);
    ok(eval { $p->backup_handle_log_file(99, "$dir/b1.log"); 1 }, 'log file without backup_init');
    ok(grep({ $_->[1] eq 'no backup of guest 99 in this job; its task log is not kept' } @log),
        'and a line saying so instead');
    $p->job_cleanup();
}

# ---------------------------------------------------------------- a container

# vzdump's order for a container: prepare while privileged, backup_container
# in a forked child (which uses the connection it inherited), cleanup.
{
    my $ct = "$dir/ct";
    mkdir($ct);
    mkdir("$ct/etc");
    mkdir("$ct/var");
    mkdir("$ct/var/cache");
    for my $file ('etc/hostname', 'var/cache/junk', 'big') {
        open(my $fh, '>', "$ct/$file") or die;
        print $fh ($file eq 'big' ? ('x' x 300000) : "$file\n");
        close($fh);
    }
    my $p = $plugin->new_backup_provider($nbd, $storeid, $logf);
    @log = ();
    $p->job_init($t0 + 300);
    my $init = $p->backup_init(4343, 'lxc', $t0 + 300);
    is($p->backup_get_mechanism(4343, 'lxc'), 'directory', 'container: directory mechanism');
    my $info = { directory => $ct, sources => ['.'], 'backup-user-id' => $>, 'bandwidth-limit' => 0 };
    $p->backup_container_prepare(4343, $info);
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        my $ok = eval { $p->backup_container(4343, "arch: amd64\nhostname: ct\n", ['/var/cache/**'], $info); 1 };
        print STDERR "backup_container: $@" if !$ok;
        POSIX::_exit($ok ? 0 : 1);
    }
    waitpid($pid, 0);
    is($?, 0, 'container: backup_container in a forked child');
    my $res = $p->backup_cleanup(4343, 'lxc', $? == 0 ? 1 : 0, {});
    cmp_ok($res->{stats}->{'archive-size'}, '>', 300000, 'container: archive size');
    $p->job_cleanup();
    my $volname = "backup/$init->{'archive-name'}";
    my $r = $plugin->new_backup_provider($nbd, $storeid, $logf);
    my ($mechanism, $vmtype) = $r->restore_get_mechanism($volname);
    is("$mechanism/$vmtype", 'tar/lxc', 'container: restore mechanism');
    is($r->archive_get_guest_config($volname), "arch: amd64\nhostname: ct\n", 'container: config');
    my $short = $r->restore_container_init($volname, {});
    my $long = $r->restore_container_init($volname, $storeid, {});
    is_deeply($short, $long, 'container: restore_container_init in both argument forms');
    my @names = sort grep { length } map { s!^\./!!r } split /\n/, run('tar', '-tf', $short->{'tar-path'});
    is_deeply(\@names, [sort qw(big etc/ etc/hostname var/ var/cache/)], 'container: archive contents, exclusion honoured');
    $r->restore_container_cleanup($volname, {});
}

# ---------------------------------------------------------------- restores

restore_and_compare('b1', $v1, $nbd);
restore_and_compare('b2', $v2, $nbd);
restore_and_compare('b3', $v3, $fh_cfg);
restore_and_compare('b5', $v5, $nbd);

# ---------------------------------------------------------------- storage methods

my $vols = $plugin->list_volumes($storeid, $nbd, $vmid, ['backup']);
is_deeply([map { $_->{volid} } @$vols], [$v1, $v2, $v3, $v5], 'list_volumes');
is($vols->[1]->{parent}, $v1, 'an incremental names its parent');
is($vols->[0]->{protected}, 0, 'protected as 0/1');
is_deeply($plugin->list_volumes($storeid, $nbd, undef, ['images']), [], 'no images');
my (undef, $v2name) = split(/:/, $v2, 2);
my @info = $plugin->volume_size_info($nbd, $storeid, $v2name);
is(scalar(@info), 5, 'volume_size_info: (size, format, used, parent, ctime)');
is($info[3], $v1, 'volume_size_info: parent');
is($info[4], $t0 + 60, 'volume_size_info: ctime');
$plugin->update_volume_attribute($nbd, $storeid, $v2name, 'notes', "before the upgrade");
is($plugin->get_volume_attribute($nbd, $storeid, $v2name, 'notes'), 'before the upgrade', 'notes');
$plugin->update_volume_attribute($nbd, $storeid, $v2name, 'protected', 1);
ok($plugin->get_volume_attribute($nbd, $storeid, $v2name, 'protected'), 'protected');
ok(!eval { $plugin->update_volume_attribute($nbd, $storeid, $v2name, 'color', 1); 1 },
    'unknown attribute refused');
ok(!eval { $plugin->free_image($storeid, $nbd, $v2name); 1 }, 'a protected backup is not removed');
my $marks = $plugin->prune_backups($nbd, $storeid, { 'keep-last' => 1 }, $vmid, 'qemu', 1);
is_deeply({ map { $_->{volid} => $_->{mark} } @$marks },
    { $v1 => 'remove', $v2 => 'protected', $v3 => 'remove', $v5 => 'keep' }, 'prune marks (dry run)');
my (undef, $v5name) = split(/:/, $v5, 2);
$plugin->free_image($storeid, $nbd, $v5name);
is(scalar(@{ $plugin->list_volumes($storeid, $nbd, $vmid, ['backup']) }), 3, 'free_image');
my @st = $plugin->status($storeid, $nbd, {});
ok($st[0] > 0 && $st[3] == 1, 'status: total and active');
my @gone = $plugin->status($storeid, { %$nbd, path => "$dir/missing" }, {});
is($gone[3], 0, 'status of a missing directory: inactive');

done_testing();
