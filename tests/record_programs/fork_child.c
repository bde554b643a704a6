/* fork: the child maps and writes M pages (argv[1], default 8) and exits 5;
 * the parent waits for it and exits with its status + 1. Prints the child's
 * pid and mapping. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long m = argc > 1 ? atol(argv[1]) : 8;
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		char *p = mmap(NULL, m * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			_exit(1);
		for (long i = 0; i < m; i++)
			p[i * 4096] = 1;
		printf("child %d %p\n", getpid(), (void *)p);
		fflush(stdout);
		_exit(5);
	}
	int st;
	if (waitpid(pid, &st, 0) != pid)
		return 1;
	return WEXITSTATUS(st) + 1;
}
