/* Writes into a fresh page of its own through process_vm_writev(): the
 * kernel fills the page through GUP, which raises no page-fault exception,
 * so a recorder that only sees faults misses this first touch. */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

int main(void)
{
	char *p = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char msg[] = "written by GUP";
	struct iovec local = { msg, sizeof msg }, remote = { p + 4096, sizeof msg };
	if (p == MAP_FAILED || process_vm_writev(getpid(), &local, 1, &remote, 1, 0) != sizeof msg)
		return 1;
	printf("%p\n", (void *)p);
	return 0;
}
