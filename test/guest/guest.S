/*
 * vmemd-test-guest: tiny x86_64 bare-metal guest that executes memory
 * commands posted by the host through a mailbox page.  See README.md.
 *
 * Boot contract (set up by vmemd): flat image at GPA 0x100000, entered at its
 * first byte in 64-bit long mode, CS=0x08, data segments 0x10, identity map of
 * [0, 512 GiB) with 2 MiB pages, RSP=0x100000, IF=0, no IDT.
 * Only plain integer instructions are used (mov/add/sub/cmp/jcc/call/ret/
 * in/out/pause/hlt/rol/and/test): guest ring 0 runs through KVM's emulator.
 *
 * Mailbox ABI (4 KiB page at GPA 0xF0000000, little-endian):
 *   0x000 u32 seq         host: new value (1, 2, 3, ...) posts a batch, written
 *                         AFTER count and the commands.  0 and 0xFFFFFFFF (page
 *                         not mapped yet: MMIO reads return all ones) and the
 *                         last handled value mean "nothing to do".
 *   0x004 u32 ack         guest: set to seq once the whole batch is done (all
 *                         result/status stores are issued before this store).
 *   0x008 u32 count       host: number of commands, clamped to 100 by the guest.
 *   0x00C u32 boot_magic  guest: 0x4D454D56 ("VMEM" in memory) written whenever
 *                         the guest reads a seq != 0xFFFFFFFF and the field does
 *                         not already hold it (i.e. on first sight of the page).
 *   0x040 + i*32          command i (i < 100, ends at 0xCC0):
 *     +0x00 u32 op        host
 *     +0x04 u32 status    guest: 0 done, 1 unknown op
 *     +0x08 u64 addr      host: guest-physical (= virtual) address
 *     +0x10 u64 value     host
 *     +0x18 u64 result    guest (read ops); input length for op 5
 *   ops:
 *     1 read32   result = zero-extended u32 loaded from addr (one 32-bit mov)
 *     2 read64   result = u64 loaded from addr (one 64-bit mov)
 *     3 write32  store low 32 bits of value to addr (one 32-bit mov)
 *     4 write64  store value to addr (one 64-bit mov)
 *     5 fill     store value (64-bit movs) to every 8-byte word of
 *                [addr, addr + result); result is a byte length, rounded
 *                down to a multiple of 8; result is left unchanged
 *     6 print    write value as 16 lowercase hex digits + "\n" to port 0x3F8
 *     7 exit     out (value & 0xff) to port 0xF4; if the host resumes the
 *                guest, it carries on with the next command
 *     8 hlt      execute hlt (IF=0); if the host resumes, carry on
 *     9 irq_on   take interrupts: mask both 8259 PICs, load an IDT whose
 *                vectors 0x20-0x5F each add 1 to the u32 at mailbox
 *                0xD00 + 4*(vector - 0x20) and send the LAPIC an EOI,
 *                enable the LAPIC (spurious vector 0x5F), sti.  The host
 *                routes pins itself (IOAPIC writes through op 3).
 *    10 out8     out (value & 0xff) to port addr
 *    11 irq_off  cli
 * Serial: every byte is one `out 0x3F8, al` (the LSR is not polled).
 * At boot the guest prints "vmemd-test-guest: ready\n".
 */
        .intel_syntax noprefix
        .code64

#define SERIAL_PORT   0x3F8
#define EXIT_PORT     0xF4
#define MAILBOX       0xF0000000
#define MB_SEQ        0x000
#define MB_ACK        0x004
#define MB_COUNT      0x008
#define MB_MAGIC      0x00C
#define MB_CMDS       0x040
#define CMD_SIZE      32
#define CMD_OP        0x00
#define CMD_STATUS    0x04
#define CMD_ADDR      0x08
#define CMD_VALUE     0x10
#define CMD_RESULT    0x18
#define MAX_CMDS      100
#define BOOT_MAGIC    0x4D454D56
#define POLL_PAUSES   8
#define MB_IRQ_COUNTS 0xD00             /* u32 per vector 0x20..0x5F */
#define IRQ_FIRST     0x20
#define IRQ_VECTORS   64
#define IDT_BASE      0x10000           /* 256 gates of 16 bytes, zero (absent) unless set */
#define LAPIC_SVR     0xFEE000F0
#define LAPIC_EOI     0xFEE000B0

        .section .text.entry, "ax"
        .globl _start
_start:
        mov     esp, 0x100000           /* zero-extends: rsp = 0x100000 */
        lea     rsi, [rip + banner]
        call    puts

        mov     ebx, MAILBOX            /* rbx = mailbox base (zero-extended) */
        xor     r12d, r12d              /* r12d = last handled seq */

poll:
        mov     eax, dword ptr [rbx + MB_SEQ]
        cmp     eax, 0xFFFFFFFF         /* mailbox not mapped yet */
        je      idle
        cmp     dword ptr [rbx + MB_MAGIC], BOOT_MAGIC
        je      1f
        mov     dword ptr [rbx + MB_MAGIC], BOOT_MAGIC
1:      test    eax, eax
        jz      idle
        cmp     eax, r12d
        je      idle

        /* new batch: r13d = seq, ecx = count, rdi = command pointer */
        mov     r13d, eax
        mov     ecx, dword ptr [rbx + MB_COUNT]
        cmp     ecx, MAX_CMDS
        jbe     2f
        mov     ecx, MAX_CMDS
2:      lea     rdi, [rbx + MB_CMDS]

next_cmd:
        test    ecx, ecx
        jz      batch_done
        mov     eax, dword ptr [rdi + CMD_OP]
        mov     rdx, qword ptr [rdi + CMD_ADDR]
        mov     r8, qword ptr [rdi + CMD_VALUE]
        cmp     eax, 1
        je      op_read32
        cmp     eax, 2
        je      op_read64
        cmp     eax, 3
        je      op_write32
        cmp     eax, 4
        je      op_write64
        cmp     eax, 5
        je      op_fill
        cmp     eax, 6
        je      op_print
        cmp     eax, 7
        je      op_exit
        cmp     eax, 8
        je      op_hlt
        cmp     eax, 9
        je      op_irq_on
        cmp     eax, 10
        je      op_out8
        cmp     eax, 11
        je      op_irq_off
        mov     dword ptr [rdi + CMD_STATUS], 1     /* unknown op */
        jmp     cmd_end

op_read32:
        mov     eax, dword ptr [rdx]    /* exactly one 32-bit load */
        mov     qword ptr [rdi + CMD_RESULT], rax   /* upper half is zero */
        jmp     cmd_ok
op_read64:
        mov     rax, qword ptr [rdx]    /* exactly one 64-bit load */
        mov     qword ptr [rdi + CMD_RESULT], rax
        jmp     cmd_ok
op_write32:
        mov     dword ptr [rdx], r8d    /* exactly one 32-bit store */
        jmp     cmd_ok
op_write64:
        mov     qword ptr [rdx], r8     /* exactly one 64-bit store */
        jmp     cmd_ok
op_fill:
        mov     r9, qword ptr [rdi + CMD_RESULT]    /* length in bytes */
3:      cmp     r9, 8
        jb      cmd_ok
        mov     qword ptr [rdx], r8
        add     rdx, 8
        sub     r9, 8
        jmp     3b
op_print:
        call    print_hex
        jmp     cmd_ok
op_exit:
        mov     eax, r8d
        out     EXIT_PORT, al
        jmp     cmd_ok
op_hlt:
        hlt
        jmp     cmd_ok

op_out8:
        mov     eax, r8d
        out     dx, al                  /* port in dx (addr) */
        jmp     cmd_ok
op_irq_off:
        cli
        jmp     cmd_ok
op_irq_on:
        mov     al, 0xFF                /* the PICs' ExtINT would reach vector 0+pin: mask them */
        out     0x21, al
        out     0xA1, al
        /* gate i (vector IRQ_FIRST + i) -> irq_stubs + 16*i: present, DPL 0, 64-bit interrupt gate */
        lea     r9, [rip + irq_stubs]
        mov     r10d, IDT_BASE + 16 * IRQ_FIRST
        mov     r11d, IRQ_VECTORS
8:      mov     rax, r9
        and     eax, 0xFFFF
        or      eax, 0x00080000         /* selector 0x08 */
        mov     dword ptr [r10], eax
        mov     rax, r9
        shr     rax, 16
        shl     eax, 16
        or      eax, 0x8E00             /* P, DPL 0, type 0xE */
        mov     dword ptr [r10 + 4], eax
        mov     rax, r9
        shr     rax, 32
        mov     dword ptr [r10 + 8], eax
        mov     dword ptr [r10 + 12], 0
        add     r9, 16
        add     r10, 16
        dec     r11d
        jnz     8b
        sub     rsp, 16
        mov     word ptr [rsp], 16 * 256 - 1
        mov     qword ptr [rsp + 2], IDT_BASE
        lidt    [rsp]
        add     rsp, 16
        mov     eax, LAPIC_SVR
        mov     dword ptr [rax], 0x100 | (IRQ_FIRST + IRQ_VECTORS - 1)  /* enabled, spurious 0x5F */
        sti
        jmp     cmd_ok

cmd_ok:
        mov     dword ptr [rdi + CMD_STATUS], 0
cmd_end:
        add     rdi, CMD_SIZE
        dec     ecx
        jmp     next_cmd

batch_done:
        mov     dword ptr [rbx + MB_ACK], r13d      /* after all result stores */
        mov     r12d, r13d
        jmp     poll

idle:
        mov     eax, POLL_PAUSES
4:      pause
        dec     eax
        jnz     4b
        jmp     poll

/* Interrupt entry: each stub pushes its vector; the common part counts it in the
 * mailbox (an MMIO write, ignored, while the mailbox is not mapped), sends the LAPIC
 * an EOI and returns.  Only rax and rdx are used, and saved. */
        .balign 16
irq_stubs:
        .set    vec, IRQ_FIRST
        .rept   IRQ_VECTORS
        .balign 16
        push    vec
        jmp     irq_common
        .set    vec, vec + 1
        .endr
irq_common:
        push    rax
        push    rdx
        mov     eax, dword ptr [rsp + 16]   /* the vector */
        sub     eax, IRQ_FIRST
        shl     eax, 2
        add     eax, MAILBOX + MB_IRQ_COUNTS
        mov     edx, eax
        add     dword ptr [rdx], 1
        mov     edx, LAPIC_EOI
        mov     dword ptr [rdx], 0
        pop     rdx
        pop     rax
        add     rsp, 8
        iretq

/* puts: print NUL-terminated string at rsi.  Clobbers rax, rdx, rsi. */
puts:
        mov     al, byte ptr [rsi]
        test    al, al
        jz      5f
        mov     dx, SERIAL_PORT
        out     dx, al
        add     rsi, 1
        jmp     puts
5:      ret

/* print_hex: print r8 as 16 hex digits + "\n".  Clobbers rax, rdx, r10. */
print_hex:
        mov     r10d, 16
        mov     dx, SERIAL_PORT
6:      rol     r8, 4
        mov     eax, r8d
        and     eax, 0xF
        cmp     eax, 10
        jb      7f
        add     eax, 'a' - 10 - '0'
7:      add     eax, '0'
        out     dx, al
        dec     r10d
        jnz     6b
        mov     al, 10
        out     dx, al
        ret

        .section .rodata, "a"
banner: .asciz  "vmemd-test-guest: ready\n"
