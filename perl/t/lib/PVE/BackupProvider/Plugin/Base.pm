package PVE::BackupProvider::Plugin::Base;

# A stand-in for Proxmox VE's base class of backup providers, written from
# its documentation (pve-storage, src/PVE/BackupProvider/Plugin/Base.pm):
# every method of the API exists and dies until a subclass implements it.

use strict;
use warnings;

our @METHODS = qw(
    new provider_name job_init job_cleanup backup_init backup_cleanup
    backup_get_mechanism backup_handle_log_file backup_vm_query_incremental backup_vm
    backup_container_prepare backup_container restore_get_mechanism
    archive_get_guest_config archive_get_firewall_config restore_vm_init
    restore_vm_cleanup restore_vm_volume_init restore_vm_volume_cleanup
    restore_container_init restore_container_cleanup
);

for my $method (@METHODS) {
    no strict 'refs';
    *{$method} = sub { die "implement me in subclass\n" };
}

1;
