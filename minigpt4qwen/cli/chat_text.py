"""What the terminal chat (`cli/chat.py`) shows and reads: its texts and prompts, and how a typed line, a path
or a `:conf` value is taken."""

from __future__ import annotations

import json
import re

WELCOME = """\
Welcome to MiniGPT4Qwen: type a question to chat, :h for the commands.
(欢迎使用 MiniGPT4Qwen：输入内容即可进行对话，:h 显示命令帮助。)"""
HELP = """\
Commands 命令:
    :help / :h                 show this help                         显示帮助信息
    :exit / :quit / :q         leave                                  退出
    :clear / :cl               clear the screen                       清屏
    :clear-history / :clh      clear the history, keep the images     清除对话历史（保留图片）
    :new                       start over: no history, no images      清除对话历史和图片
    :history / :his            show the history                       显示对话历史
    :seed                      show the random seed                   显示当前随机种子
    :seed <N>                  set the random seed (none: unset)      设置随机种子
    :conf                      show the generation settings           显示生成配置
    :conf <key>=<value> ...    change generation settings             修改生成配置
                               (stop="\n" or stop=["a", "b"]: JSON strings and lists)
    :reset-conf                restore the starting settings          重置生成配置
    :img                       list the images                        显示图片列表
    :img <PATH>                add an image for the next question     为下一个问题添加图片
Up/Down recall earlier lines (上下键调出输入历史); Ctrl-C stops a reply being generated; Ctrl-D leaves.
Ctrl-C 中断生成；Ctrl-D 退出。"""
IMAGE_INPUT = "Image path, one per line; :f to finish (图片路径，每行一个，可多张；输入 :f 结束并开始对话)> "
USER = "User> "
CONF_ITEM_START = re.compile(r"\s+(?=[A-Za-z_]\w*=)")  # where the next key=value of a `:conf` line begins
ASSISTANT = "Assistant: "


def unquote(text: str) -> str:
    """A path as typed or dropped into a terminal: surrounding quotes removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def conf_value(text: str) -> str:
    """A `:conf` value as typed: a double-quoted one is a JSON string (escapes such as \\n work), a single-quoted one
    is taken literally without its quotes, anything else as it is."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return unquote(text)


def read_line(prompt: str) -> str | None:
    """One stripped input line; None on end of input. Ctrl-C at a prompt only prints a hint."""
    while True:
        try:
            return input(prompt).strip()
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("\n[INFO] Ctrl-C stops a reply; :q or Ctrl-D leaves (:q 或 Ctrl-D 退出)")
        except UnicodeDecodeError:
            print("[ERROR] encoding error in the input (输入编码错误)")
