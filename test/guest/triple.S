/*
 * triple.bin: prints "triple\n" on port 0x3F8, then triple-faults on purpose:
 * it loads an IDT with limit 0, so the #UD raised by ud2 cannot be delivered
 * (-> #GP -> #DF -> triple fault); KVM reports KVM_EXIT_SHUTDOWN (8).
 * Same boot contract as guest.S.
 */
        .intel_syntax noprefix
        .code64
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     rsi, [rip + msg]
        mov     dx, 0x3F8
1:      mov     al, byte ptr [rsi]
        test    al, al
        jz      2f
        out     dx, al
        add     rsi, 1
        jmp     1b
2:      lidt    [rip + null_idt]
        ud2
3:      hlt                             /* not reached */
        jmp     3b

        .section .rodata, "a"
        .balign 8
null_idt:
        .word   0                       /* limit */
        .quad   0                       /* base */
msg:    .asciz  "triple\n"
