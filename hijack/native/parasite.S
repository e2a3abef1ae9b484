/* The parasite: a batch of system calls run inside a stopped target in one resume
 * (hijack/mutator/parasite.py, which holds these bytes and says why they are kept
 * there rather than built; tests/test_parasite.py assembles this file with gcc and
 * checks the bytes are the same).
 *
 * Position-independent, no stack, no data of its own. The tracer sets:
 *   rip = the first byte, rbx = the table, r12 = the number of entries.
 * A table entry is 64 bytes:
 *   +0  u32 system call number
 *   +4  u32 flags: bit j (0..5) = argument j holds the index of an earlier entry,
 *       whose result is passed instead (patched in place before the call);
 *       bit 8 = stop the batch if this call fails (-4095..-1)
 *   +8  six u64 arguments (rdi, rsi, rdx, r10, r8, r9)
 *   +56 u64 result, written back
 * It ends on int3 with r14 = the number of entries it ran (the failed one included).
 * rcx and r11 are the syscall instruction's; every register is the tracer's to put
 * back, and is put back.
 */
	.intel_syntax noprefix
	.text
	.globl parasite
parasite:
	xor r14d, r14d                          /* r14: index of the entry to run */
next_call:
	cmp r14, r12
	jae done                                /* every entry ran */
	mov r15, r14
	shl r15, 6
	add r15, rbx                            /* r15: this entry (table + 64 * index) */
	mov ecx, dword ptr [r15 + 4]            /* its flags */
	xor ebp, ebp                            /* ebp: argument j */
chain:
	bt ecx, ebp
	jnc plain                               /* argument j is a value */
	mov rax, qword ptr [r15 + rbp * 8 + 8]  /* ... else an index of an earlier entry */
	shl rax, 6
	mov rax, qword ptr [rbx + rax + 56]     /* that entry's result */
	mov qword ptr [r15 + rbp * 8 + 8], rax  /* becomes argument j */
plain:
	inc ebp
	cmp ebp, 6
	jb chain
	mov eax, dword ptr [r15]                /* the call's number */
	mov rdi, qword ptr [r15 + 8]
	mov rsi, qword ptr [r15 + 16]
	mov rdx, qword ptr [r15 + 24]
	mov r10, qword ptr [r15 + 32]
	mov r8, qword ptr [r15 + 40]
	mov r9, qword ptr [r15 + 48]
	syscall
	mov qword ptr [r15 + 56], rax           /* its result */
	inc r14
	cmp rax, -4095
	jb next_call                            /* not an error (unsigned below -4095) */
	test byte ptr [r15 + 5], 1
	jz next_call                            /* an error the caller lets pass */
done:
	int3                                    /* the one stop of the whole batch */
