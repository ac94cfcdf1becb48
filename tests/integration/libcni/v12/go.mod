module flock.test/libcni12

go 1.21

require github.com/containernetworking/cni v1.2.3
