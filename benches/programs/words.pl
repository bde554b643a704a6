# Fixed work for perl in benches/real_programs.py: a hash of many keys, a
# large string built and split, a sort.
use strict;
use warnings;
my %h;
for my $i (0 .. 149999) {
    my $k = sprintf("k%06d", ($i * 7919) % 200003);
    push @{ $h{substr($k, 0, 4)} }, $i;
}
my $s = join(",", map { $_ * 3 } 0 .. 199999);
my @parts = split /,/, $s;
my @sorted = sort { $b cmp $a } @parts;
my $n = 0;
$n += scalar(@{ $h{$_} }) for keys %h;
print $n + scalar(@sorted), "\n";
