package PVE::BackupProvider::Plugin::DirBackup;

# The backup provider of a dirbackup storage on a Proxmox VE node.
#
# Every method forwards to a dirbackup provider process (`dirbackup
# pve-serve`, see src/dirbackup/pveserve.py): one JSON request a line over a
# Unix socket pair, the process's log lines passed to PVE's log function,
# then one reply.  No policy lives here.  The process is started by
# job_init (or, for restores, by the first call) and stopped by job_cleanup,
# the restore cleanups outside a job, or when the object goes away.
#
# The package also holds the client functions the storage plugin
# (PVE::Storage::Custom::DirBackupPlugin) uses for its own one-shot calls.

use strict;
use warnings;

use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC);
use JSON::PP;
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);

use base qw(PVE::BackupProvider::Plugin::Base);

# `make install-pve` writes the installed program's path here; the
# environment variable DIRBACKUP_COMMAND (words split at blanks) wins.
our $COMMAND = '@DIRBACKUP@';

# The storage options the provider process understands.
our @STORAGE_KEYS = qw(
    path vm-backup-mode vm-backup-mechanism lxc-backup-mode compress
    prune-backups max-protected-backups lock-timeout io-timeout
);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;

# ---------------------------------------------------------------- client

sub command_words {
    my $cmd = $ENV{DIRBACKUP_COMMAND};
    $cmd = ($COMMAND =~ /^\@/ ? 'dirbackup' : $COMMAND) if !defined($cmd) || $cmd eq '';
    return split(' ', $cmd);
}

sub storage_config {
    my ($scfg) = @_;
    my $out = {};
    for my $key (@STORAGE_KEYS) {
        $out->{$key} = $scfg->{$key} if defined($scfg->{$key});
    }
    return $out;
}

# Start `dirbackup pve-serve` on one end of a socket pair.
sub start_server {
    my ($storeid, $scfg) = @_;
    die "dirbackup: storage '$storeid' has no path\n" if !defined($scfg->{path});
    my ($mine, $theirs);
    socketpair($mine, $theirs, AF_UNIX, SOCK_STREAM, PF_UNSPEC)
        or die "dirbackup: socketpair: $!\n";
    my @cmd = (
        command_words(), 'pve-serve', '--storeid', $storeid,
        '--config', $json->encode(storage_config($scfg)), '--fd', fileno($theirs),
    );
    my $pid = fork();
    die "dirbackup: fork: $!\n" if !defined($pid);
    if ($pid == 0) {
        eval {
            close($mine);
            my $flags = fcntl($theirs, F_GETFD, 0);
            fcntl($theirs, F_SETFD, $flags & ~FD_CLOEXEC) if defined($flags);
            no warnings 'exec';
            exec { $cmd[0] } @cmd;
            print STDERR "dirbackup: cannot run $cmd[0]: $!\n";
        };
        POSIX::_exit(127);
    }
    close($theirs);
    $mine->autoflush(1);
    return { pid => $pid, sock => $mine, owner => $$, command => $cmd[0] };
}

# One request; log lines go to $log; dies with the provider's one-line error.
sub call_server {
    my ($srv, $log, $method, @args) = @_;
    die "dirbackup: no provider process for $method\n" if !$srv || !$srv->{sock};
    local $SIG{PIPE} = 'IGNORE';
    my $sock = $srv->{sock};
    my $line = $json->encode({ method => $method, args => \@args });
    if (!print {$sock} "$line\n") {
        _ended($srv, $method);
    }
    while (defined(my $reply = <$sock>)) {
        my $msg = eval { $json->decode($reply) };
        die "dirbackup: unreadable reply to $method\n" if ref($msg) ne 'HASH';
        if (my $entry = $msg->{log}) {
            eval { $log->($entry->[0], $entry->[1]) } if $log;
            next;
        }
        die "$msg->{error}\n" if exists($msg->{error});
        return $msg->{result};
    }
    _ended($srv, $method);
}

# The process is gone: say how, as far as its exit status tells.
sub _ended {
    my ($srv, $method) = @_;
    my $status;
    for (1 .. 40) {    # its end was seen: its exit status follows at once
        last if !$srv->{pid};
        if (waitpid($srv->{pid}, POSIX::WNOHANG()) == $srv->{pid}) {
            $status = $?;
            $srv->{pid} = undef;
            last;
        }
        select(undef, undef, undef, 0.025);
    }
    my $how = !defined($status) ? '' : ($status >> 8) == 127
        ? " ($srv->{command} could not be run: is dirbackup installed? see make install-pve)"
        : ' (exit status ' . ($status >> 8) . ', signal ' . ($status & 127) . ')';
    die "dirbackup: the provider process ended during $method$how\n";
}

# Close our end (the process sees the end, aborts what runs, exits); wait
# for it, then TERM, then KILL.
sub stop_server {
    my ($srv) = @_;
    return if !$srv;
    local $SIG{PIPE} = 'IGNORE';    # close flushes what a failed print left: never die of it
    close($srv->{sock}) if $srv->{sock};
    $srv->{sock} = undef;
    return if !$srv->{pid};
    my $pid = $srv->{pid};
    for my $signal (undef, 'TERM', 'KILL') {
        kill($signal, $pid) if defined($signal);
        for (1 .. 200) {
            my $res = waitpid($pid, POSIX::WNOHANG());
            if ($res == $pid || $res == -1) {
                $srv->{pid} = undef;
                return;
            }
            select(undef, undef, undef, 0.05);
        }
    }
}

# One call in a process of its own (the storage plugin's class methods).
sub call_once {
    my ($storeid, $scfg, $log, $method, @args) = @_;
    my $srv = start_server($storeid, $scfg);
    my $res = eval { call_server($srv, $log, $method, @args) };
    my $err = $@;
    eval { call_server($srv, undef, 'exit') } if !$err;
    stop_server($srv);
    die $err if $err;
    return $res;
}

# Raw text from PVE (bytes) to characters for JSON, and back.
sub text_in {
    my ($text) = @_;
    return undef if !defined($text);
    utf8::decode($text);    # left as is unless valid UTF-8
    return $text;
}

sub text_out {
    my ($text) = @_;
    return undef if !defined($text);
    utf8::encode($text) if utf8::is_utf8($text);
    return $text;
}

# ---------------------------------------------------------------- provider

sub new {
    my ($class, $storage_plugin, $scfg, $storeid, $log_function) = @_;
    return bless {
        'storage-plugin' => $storage_plugin,
        scfg => $scfg,
        storeid => $storeid,
        'log-function' => $log_function,
        server => undef,
        job => 0,
    }, $class;
}

sub _log {
    my ($self, $level, $msg) = @_;
    my $log = $self->{'log-function'};
    eval { $log->($level, $msg) } if $log;
}

sub _server {
    my ($self) = @_;
    $self->{server} //= start_server($self->{storeid}, $self->{scfg});
    return $self->{server};
}

sub _call {
    my ($self, $method, @args) = @_;
    return call_server($self->_server(), $self->{'log-function'}, $method, @args);
}

sub _stop {
    my ($self) = @_;
    my $srv = delete $self->{server};
    stop_server($srv) if $srv && $srv->{owner} == $$;
}

sub DESTROY {
    my ($self) = @_;
    local ($@, $!, $?);
    $self->_stop() if $self->{server};
}

sub provider_name {
    return 'dirbackup';
}

sub job_init {
    my ($self, $start_time) = @_;
    $self->_stop();    # a process left from an earlier job of this object
    $self->{job} = 1;
    $self->_call('job_init', $start_time + 0);
    return;
}

# Stops the process whatever happens; a second call after a failed first
# finds nothing to stop and returns, as does a call after the process's end
# was already reported (a failed job_init).
sub job_cleanup {
    my ($self) = @_;
    $self->{job} = 0;
    return if !$self->{server};
    return $self->_stop() if !$self->{server}->{pid};
    eval { $self->_call('job_cleanup') };
    my $err = $@;
    $self->_stop();
    die $err if $err;
    return;
}

sub backup_init {
    my ($self, $vmid, $vmtype, $start_time) = @_;
    return $self->_call('backup_init', $vmid + 0, $vmtype, $start_time + 0);
}

sub backup_cleanup {
    my ($self, $vmid, $vmtype, $success, $info) = @_;
    my %info = %{ $info // {} };
    return $self->_call(
        'backup_cleanup', $vmid + 0, $vmtype, $success ? JSON::PP::true : JSON::PP::false, \%info,
    ) // {};
}

sub backup_get_mechanism {
    my ($self, $vmid, $vmtype) = @_;
    return $self->_call('backup_get_mechanism', $vmid + 0, $vmtype);
}

sub backup_vm_query_incremental {
    my ($self, $vmid, $volumes) = @_;
    my $query = {};
    for my $device (keys %{ $volumes // {} }) {
        $query->{$device} = { size => $volumes->{$device}->{size} + 0 };
    }
    return $self->_call('backup_vm_query_incremental', $vmid + 0, $query);
}

# file-handle: the provider process opens /proc/<our pid>/fd/<fd>, and
# gets next-dirty-region's regions as a list (read here, before the call).
sub _volume {
    my ($device, $vol) = @_;
    my $out = { size => $vol->{size} + 0 };
    for my $key ('bitmap-mode', 'nbd-path', 'bitmap-name') {
        $out->{$key} = "$vol->{$key}" if defined($vol->{$key});
    }
    my $fh = $vol->{'file-handle'};
    if (defined($fh)) {
        my $fd = ref($fh) ? fileno($fh) : $fh;
        die "dirbackup: $device: the file handle is not open\n" if !defined($fd);
        $out->{'file-handle'} = { pid => $$ + 0, fd => $fd + 0 };
        my @regions;
        if (my $next = $vol->{'next-dirty-region'}) {
            while (my ($offset, $length) = $next->()) {
                last if !defined($offset);
                push @regions, [$offset + 0, $length + 0];
            }
        } else {
            @regions = ([0, $out->{size}]);
        }
        $out->{regions} = \@regions;
    }
    return $out;
}

sub backup_vm {
    my ($self, $vmid, $guest_config, $volumes, $info) = @_;
    my $vols = {};
    $vols->{$_} = _volume($_, $volumes->{$_}) for keys %{ $volumes // {} };
    my %info;
    $info{'bandwidth-limit'} = ($info->{'bandwidth-limit'} // 0) + 0 if $info;
    $info{'firewall-config'} = text_in($info->{'firewall-config'})
        if $info && defined($info->{'firewall-config'});
    $self->_call('backup_vm', $vmid + 0, text_in($guest_config), $vols, \%info);
    return;
}

sub _container_info {
    my ($info) = @_;
    my %out;
    $out{directory} = "$info->{directory}" if defined($info->{directory});
    $out{sources} = [map {"$_"} @{ $info->{sources} }] if $info->{sources};
    $out{'backup-user-id'} = $info->{'backup-user-id'} + 0 if defined($info->{'backup-user-id'});
    $out{'bandwidth-limit'} = ($info->{'bandwidth-limit'} // 0) + 0;
    $out{'firewall-config'} = text_in($info->{'firewall-config'})
        if defined($info->{'firewall-config'});
    return \%out;
}

sub backup_container_prepare {
    my ($self, $vmid, $info) = @_;
    $self->_call('backup_container_prepare', $vmid + 0, _container_info($info // {}));
    return;
}

# Runs in PVE's forked child: it uses the connection it inherited.
sub backup_container {
    my ($self, $vmid, $guest_config, $exclude_patterns, $info) = @_;
    $self->_call(
        'backup_container', $vmid + 0, text_in($guest_config),
        [map {"$_"} @{ $exclude_patterns // [] }], _container_info($info // {}),
    );
    return;
}

# Never dies: PVE calls it also when backup_init never ran, outside an eval.
sub backup_handle_log_file {
    my ($self, $vmid, $filename) = @_;
    if (!$self->{server}) {
        $self->_log('warn', "dirbackup: no backup of guest $vmid to keep the task log with");
        return;
    }
    eval { $self->_call('backup_handle_log_file', $vmid + 0, "$filename") };
    $self->_log('warn', "dirbackup: could not keep the task log: $@") if $@;
    return;
}

sub restore_get_mechanism {
    my ($self, $volname) = @_;
    my $res = $self->_call('restore_get_mechanism', "$volname");
    return @$res;
}

sub archive_get_guest_config {
    my ($self, $volname) = @_;
    return text_out($self->_call('archive_get_guest_config', "$volname"));
}

sub archive_get_firewall_config {
    my ($self, $volname) = @_;
    return text_out($self->_call('archive_get_firewall_config', "$volname"));
}

sub restore_vm_init {
    my ($self, $volname) = @_;
    return $self->_call('restore_vm_init', "$volname");
}

sub restore_vm_cleanup {
    my ($self, $volname) = @_;
    eval { $self->_call('restore_vm_cleanup', "$volname") };
    my $err = $@;
    $self->_stop() if !$self->{job};
    die $err if $err;
    return;
}

sub restore_vm_volume_init {
    my ($self, $volname, $device_name, $info) = @_;
    return $self->_call('restore_vm_volume_init', "$volname", "$device_name", {});
}

sub restore_vm_volume_cleanup {
    my ($self, $volname, $device_name, $info) = @_;
    $self->_call('restore_vm_volume_cleanup', "$volname", "$device_name", {});
    return;
}

# PVE calls both ($volname, $info) and, in older callers, ($volname,
# $storeid, $info): only the volume name matters.
sub restore_container_init {
    my ($self, $volname, @rest) = @_;
    return $self->_call('restore_container_init', "$volname");
}

sub restore_container_cleanup {
    my ($self, $volname, @rest) = @_;
    eval { $self->_call('restore_container_cleanup', "$volname") };
    my $err = $@;
    $self->_stop() if !$self->{job};
    die $err if $err;
    return;
}

1;
