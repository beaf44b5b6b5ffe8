package PVE::JSONSchema;

# A stand-in for the part of Proxmox VE's schema code a storage.cfg value
# goes through: check one value against a property's type, enum, pattern
# and minimum, as `pvesm add` would before storing it.

use strict;
use warnings;

sub check_value {
    my ($name, $schema, $value) = @_;
    my $type = $schema->{type} // die "$name: property without a type\n";
    if ($type eq 'string') {
        die "$name: value '$value' is not one of " . join(', ', @{ $schema->{enum} }) . "\n"
            if $schema->{enum} && !grep { $_ eq $value } @{ $schema->{enum} };
        if (my $re = $schema->{pattern}) {
            die "$name: value '$value' does not match the pattern\n" if $value !~ m/^$re$/;
        }
    } elsif ($type eq 'number' || $type eq 'integer') {
        my $num = $type eq 'integer' ? qr/-?\d+/ : qr/-?\d+(?:\.\d+)?/;
        die "$name: value '$value' is not a $type\n" if $value !~ m/^$num$/;
        die "$name: value '$value' is below $schema->{minimum}\n"
            if defined($schema->{minimum}) && $value < $schema->{minimum};
    } elsif ($type ne 'boolean') {
        die "$name: unknown type '$type'\n";
    }
    return 1;
}

1;
